"""The scheme examples run with --quick as a user would run them (a subprocess each) and
write results.json with the baseline and the scheme's student(s)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLES = {
    "mutual_learning.py": {"student_alone", "student0", "student1"},
    "adversarial.py": {"teacher", "student_alone", "kd_student", "adversarial_student"},
    "data_free.py": {"teacher", "student_alone", "noise_kd_student", "dfad_student",
                     "deepinversion_student"},
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_scheme_example_quick(tmp_path, script):
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script),
                                "--quick", "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    models = results["models"]
    assert set(models) == EXAMPLES[script]
    for name, row in models.items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert f"{row['accuracy']:.4f}" in completed.stdout  # the printed table
        assert row["parameters"] > 0
    assert results["run"]["quick"] is True
    assert models["student_alone"]["accuracy"] > 0.3  # even the quick run learns (chance 0.1)
