"""The single-model scheme examples run with --quick (as CI does) and write results.json."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> the scheme's students that results.json must report beside 'student_alone'
EXAMPLES = {
    "self_distillation.py": ["self_distilled", "born_again_gen1"],
    "qat.py": ["qat_student_alone", "qat_distilled"],
    "cross_modal.py": ["cross_modal_distilled"],
    "weighted_teachers.py": ["average", "fixed", "entropy", "gold"],
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_quick(script, tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script),
                                "--quick", "--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, (f"examples/{script} --quick exited "
                                       f"{completed.returncode}\nstdout:\n{completed.stdout}\n"
                                       f"stderr:\n{completed.stderr}")
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    models = results["models"]
    for name in ["student_alone", *EXAMPLES[script]]:
        assert name in models, (name, sorted(models))
        assert 0.0 <= models[name]["accuracy"] <= 1.0
        assert f"{models[name]['accuracy']:.4f}" in completed.stdout  # the printed table
    assert models["student_alone"]["accuracy"] > 0.15  # learnt something (chance: 0.1)
    if script == "qat.py":
        for name in ("qat_student_alone", "qat_distilled"):
            assert 0.0 <= models[name]["int8_accuracy"] <= 1.0
            assert models[name]["int8_bytes"] < models["student_alone"]["bytes"]
