"""examples/teacher_assistant.py --quick (as CI runs it): the chain's two links are scored,
the student rows are compared seed by seed with the student alone, and the assistant's
checkpoints sit in the chain's stage folders."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_assistant_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "examples",
                                                             "teacher_assistant.py"),
                                "--quick", "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    assert list(models) == ["teacher", "student_alone", "kd_direct", "assistant",
                            "via_assistant"]
    for name, row in models.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["per_seed"]) == 1
        assert f"{row['accuracy']:.4f}" in completed.stdout
    for name in ("kd_direct", "via_assistant"):
        better, tied, worse = models[name]["better_tied_worse"]
        value, alone = models[name]["accuracy"], models["student_alone"]["accuracy"]
        assert (better, tied, worse) == (int(value > alone), int(value == alone),
                                         int(value < alone))
    assert models["teacher"]["accuracy"] > 0.5  # the teacher learnt (chance: 0.1)
    chain = tmp_path / "seed0" / "via_assistant"
    assert sorted(p.name for p in (chain / "stage1").glob("gs*.pkl")) == ["gs40.pkl"]
    assert sorted(p.name for p in (chain / "stage2").glob("gs*.pkl")) == ["gs40.pkl"]
