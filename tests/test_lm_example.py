"""examples/lm_distillation.py runs (--quick --from-cache) as a user would run it, in a subprocess."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from textbrewer.utils import count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("teacher", "student_alone", "distilled_student")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    output_dir = tmp_path_factory.mktemp("lm")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_distillation.py"), "--quick",
         "--from-cache", "--output-dir", str(output_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (
        f"examples/lm_distillation.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    return output_dir, results, completed.stdout


def test_results_have_the_models_with_sane_perplexities(quick_run):
    _, results, stdout = quick_run
    models = results["models"]
    assert set(MODELS) <= set(models)
    assert "distilled_from_cache" in models
    for name, row in models.items():
        value = row["perplexity"]
        assert math.isfinite(value) and value > 1.0, name
        # below a uniform guess over the 256 byte values, even after a few steps
        assert value < results["data"]["vocab_size"], name
        assert row["inference_seconds"] > 0, name
        assert len(row["per_seed"]) == len(results["run"]["seeds"]), name
        assert f"{value:.3f}" in stdout  # the table prints the same numbers
    # the teacher is trained longer and is larger: the best of the three even in a quick run
    assert models["teacher"]["perplexity"] < models["student_alone"]["perplexity"]
    assert results["speedup"] > 0
    assert results["run"]["quick"] is True
    assert results["data"]["scored_tokens"] > 0


def test_held_out_text_comes_from_other_packages(quick_run):
    _, results, _ = quick_run
    packages = {split: set(names) for split, names in results["data"]["packages"].items()}
    assert packages["train"] and packages["validation"] and packages["test"]
    assert not packages["train"] & packages["test"]
    assert not packages["train"] & packages["validation"]


def test_the_cache_reports_bytes_per_token(quick_run):
    _, results, _ = quick_run
    cache = results["cache"]
    # uint8 ids (vocabulary 256) + float16 log-probs per entry, a float32 tail mass per row
    assert cache["bytes_per_token"] >= cache["k"] * 3 + 4
    assert cache["bytes_per_token"] < cache["k"] * 3 + 8
    assert cache["tokens"] > 0


def test_parameter_counts_match_the_configs(quick_run):
    transformers = pytest.importorskip("transformers")
    output_dir, results, _ = quick_run
    configs, models = results["configs"], results["models"]
    teacher = count_parameters(transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**configs["teacher"])))
    student = count_parameters(transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**configs["student"])))
    assert models["teacher"]["parameters"] == teacher
    for name in ("student_alone", "distilled_student", "distilled_from_cache"):
        assert models[name]["parameters"] == student, name
    assert results["size_ratio"] == pytest.approx(teacher / student)
    for name in MODELS:
        pattern = os.path.join(output_dir, name, "**", "gs*.pkl")
        assert glob.glob(pattern, recursive=True), f"no checkpoint matches {pattern}"


def test_the_on_policy_rows_run_as_a_user_runs_them(tmp_path):
    """The on-policy comparison rows (GKD, DistiLLM's schedule, DistiLLM-2 with the teacher's
    generated responses) at quick size: each trains and is scored like the others."""
    pytest.importorskip("transformers")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_distillation.py"), "--quick",
         "--divergences", "forward_kl", "gkd_jsd", "distillm", "distillm2_teacher",
         "--output-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        models = json.load(handle)["models"]
    for name in ("distilled_gkd_jsd", "distilled_distillm", "distilled_distillm2_teacher"):
        value = models[name]["perplexity"]
        assert math.isfinite(value) and 1.0 < value < 256, name
        assert f"{value:.3f}" in completed.stdout, name
