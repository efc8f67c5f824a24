"""The examples run: each is executed as a user would run it, in a subprocess."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from textbrewer.testing import TinyTransformer
from textbrewer.utils import count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10


def _run_example(script, *arguments, timeout=300):
    env = dict(os.environ)
    # The package from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *arguments],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    pytest.importorskip("sklearn")
    output_dir = tmp_path_factory.mktemp("quickstart")
    completed = _run_example("quickstart.py", "--quick", "--output-dir", str(output_dir),
                             *(["--curves"] if importlib.util.find_spec("matplotlib") else []))
    assert completed.returncode == 0, (
        f"examples/quickstart.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    return output_dir, results, completed.stdout


def test_quickstart_accuracies(quickstart):
    _, results, stdout = quickstart
    models = results["models"]
    assert set(models) == {"teacher", "student_alone", "distilled_student"}
    for name, row in models.items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert f"{row['accuracy']:.4f}" in stdout  # the printed table shows the same numbers
    # Even the quick run learns: chance is 1/10.
    assert models["teacher"]["accuracy"] > 0.5
    assert models["distilled_student"]["accuracy"] > 1.5 / NUM_CLASSES


def test_quickstart_parameter_counts_match_the_configs(quickstart):
    _, results, _ = quickstart
    configs, models = results["configs"], results["models"]
    teacher = count_parameters(TinyTransformer(**configs["teacher"]))
    student = count_parameters(TinyTransformer(**configs["student"]))
    assert models["teacher"]["parameters"] == teacher
    assert models["student_alone"]["parameters"] == student
    assert models["distilled_student"]["parameters"] == student
    assert results["size_ratio"] == pytest.approx(teacher / student)
    assert teacher > student


def test_quickstart_writes_checkpoints_and_runs_callbacks(quickstart):
    output_dir, results, _ = quickstart
    for name in ("teacher", "student_alone", "distilled_student"):
        checkpoints = glob.glob(os.path.join(output_dir, name, "gs*.pkl"))
        assert checkpoints, f"no gs*.pkl checkpoint in {output_dir / name}"
        # The callback ran once per checkpoint and saw the same global steps.
        steps = sorted(int(os.path.basename(path)[2:-4]) for path in checkpoints)
        assert [entry["step"] for entry in results["history"][name]] == steps


def test_quickstart_draws_its_training_curves(quickstart):
    output_dir, _, stdout = quickstart
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("needs matplotlib (the examples extra)")
    assert (output_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in stdout
