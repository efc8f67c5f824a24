"""examples/vision.py runs: executed as a user would run it, in a subprocess."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
METHODS = ("student_alone", "kd", "dkd", "fitnets", "fitnets_kd", "at", "at_kd", "rkd", "crd",
           "student_alone_mixup", "kd_function_matching", "student_alone_long", "patient_kd")


def _run_example(script, *arguments, timeout=300):
    env = dict(os.environ)
    # The package from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *arguments],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_vision_example_quick(tmp_path):
    pytest.importorskip("sklearn")
    completed = _run_example("vision.py", "--quick", "--output-dir", str(tmp_path))
    assert completed.returncode == 0, (
        f"examples/vision.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)

    models = results["models"]
    assert set(models) == {"teacher", *METHODS}
    teacher = models["teacher"]
    assert 0.0 <= teacher["accuracy"] <= 1.0
    # Even the quick teacher learns: chance is 1/10.
    assert teacher["accuracy"] > 0.5
    seeds = results["run"]["seeds"]
    for method in METHODS:
        row = models[method]
        assert row["seeds"] == seeds, method
        assert len(row["accuracies"]) == len(seeds), method
        assert all(0.0 <= value <= 1.0 for value in row["accuracies"]), method
        assert 0.0 <= row["accuracy_mean"] <= 1.0, method
        assert row["accuracy_std"] >= 0.0, method
        assert row["parameters"] < teacher["parameters"], method
        # The printed table shows the same numbers.
        assert f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}" in completed.stdout
        # One checkpoint per (method, seed), written by the distiller / trainer.
        for seed in seeds:
            assert glob.glob(os.path.join(tmp_path, method, f"seed{seed}", "gs*.pkl")), \
                (method, seed)
    assert models["student_alone"]["delta_vs_student_alone"] == 0.0
    assert models["student_alone"]["distill_config"] is None
    # Each distilled row is compared with the student alone trained as long (and, for
    # function matching, on mixed images too).
    assert models["patient_kd"]["baseline"] == "student_alone_long"
    assert models["kd_function_matching"]["baseline"] == "student_alone_mixup"
    assert models["kd"]["baseline"] == "student_alone"
    for method in ("student_alone_mixup", "student_alone_long"):
        assert models[method]["distill_config"] is None
    # PatientTeacher's config: KD only, no hard labels.
    assert models["patient_kd"]["distill_config"]["hard_label_weight"] == 0
    assert models["patient_kd"]["distill_config"]["kd_loss_type"] == "kl"
    # Every distilled run records the configuration it used, as DistillationConfig.to_dict.
    assert models["crd"]["distill_config"]["intermediate_matches"][0]["loss"] == "crd"
    assert models["dkd"]["distill_config"]["kd_loss_weight_scheduler"][0] == "warmup"
    assert results["size_ratio"] == pytest.approx(
        teacher["parameters"] / models["student_alone"]["parameters"])
    assert f"{teacher['accuracy']:.4f}" in completed.stdout
    # The students' data: 150 labelled images; the distilled ones also the other 1197
    # training images, unlabelled.
    assert results["run"]["train_size"] == 150 and results["run"]["transfer"] is True
    assert "1347 training images (students: 150 labelled, distilled on 1347)" in completed.stdout


def test_vision_kd_and_dkd_beat_student_alone(tmp_path):
    """The full-budget runs of two seeds (about 15 s of CPU): KD and DKD, on the transfer
    set, beat the student alone on its 150 labels by 3 points or more on each seed.
    Measured (torch 2.14.1 CPU, 1 thread), seeds 0, 1: student alone 0.9222, 0.8889; kd
    0.9689, 0.9822; dkd 0.9667, 0.9844 (teacher 0.9933)."""
    pytest.importorskip("sklearn")
    completed = _run_example("vision.py", "--seeds", "0", "1", "--methods", "kd", "dkd",
                             "--output-dir", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        models = json.load(handle)["models"]
    assert models["teacher"]["accuracy"] > 0.97
    alone = models["student_alone"]["accuracies"]
    assert 0.85 < min(alone) and max(alone) < 0.95  # few labels: room for the teacher
    for method in ("kd", "dkd"):
        for seed, (distilled, baseline) in enumerate(zip(models[method]["accuracies"], alone)):
            assert distilled >= baseline + 0.03, (method, seed, distilled, baseline)
        assert models[method]["better_tied_worse"] == [2, 0, 0], method
