"""examples/mlm_distillation.py runs (--quick) as a user would run it, in a subprocess."""
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
    output_dir = tmp_path_factory.mktemp("mlm")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "mlm_distillation.py"), "--quick",
         "--output-dir", str(output_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (
        f"examples/mlm_distillation.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    return output_dir, results, completed.stdout


def test_results_have_the_three_models_with_sane_scores(quick_run):
    _, results, stdout = quick_run
    models = results["models"]
    assert set(MODELS) <= set(models)
    for name in MODELS:
        row = models[name]
        assert 0.0 <= row["masked_accuracy"] <= 1.0, name
        assert math.isfinite(row["perplexity"]) and row["perplexity"] >= 1.0, name
        # perplexity is below a uniform guess over the vocabulary
        assert row["perplexity"] < results["data"]["vocab_size"], name
        assert row["inference_seconds"] > 0, name
        assert f"{row['masked_accuracy']:.4f}" in stdout  # the table prints the same numbers
    assert results["data"]["masked_tokens"] > 0
    assert results["speedup"] > 0
    assert results["run"]["quick"] is True


def test_parameter_counts_match_the_configs(quick_run):
    transformers = pytest.importorskip("transformers")
    _, results, _ = quick_run
    configs, models = results["configs"], results["models"]
    teacher = count_parameters(transformers.BertForMaskedLM(
        transformers.BertConfig(**configs["teacher"])))
    student = count_parameters(transformers.DistilBertForMaskedLM(
        transformers.DistilBertConfig(**configs["student"])))
    assert models["teacher"]["parameters"] == teacher
    assert models["student_alone"]["parameters"] == student
    assert models["distilled_student"]["parameters"] == student
    assert results["size_ratio"] == pytest.approx(teacher / student)
    assert configs["student"]["n_layers"] * 2 == configs["teacher"]["num_hidden_layers"]


def test_checkpoints_are_written(quick_run):
    output_dir, results, _ = quick_run
    for name in MODELS:
        pattern = os.path.join(output_dir, name, "**", "gs*.pkl")
        assert glob.glob(pattern, recursive=True), f"no checkpoint matches {pattern}"
