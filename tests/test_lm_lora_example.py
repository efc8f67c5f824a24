"""examples/lm_lora.py runs (--quick) as a user would run it, in a subprocess; its adapters
reload on the saved base to the perplexity it reported."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    output_dir = tmp_path_factory.mktemp("lm_lora")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_lora.py"), "--quick",
         "--output-dir", str(output_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (
        f"examples/lm_lora.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    return output_dir, results, completed.stdout + completed.stderr


def test_the_table_has_both_lora_runs_with_sane_perplexities(quick_run):
    _, results, output = quick_run
    models = results["models"]
    assert set(models) == {"teacher", "base", "lora_alone", "lora_kd"}
    for name, row in models.items():
        assert math.isfinite(row["perplexity"]) and 1.0 < row["perplexity"] < 256, name
        assert f"{row['perplexity']:.3f}" in output, name
    for name in ("lora_alone", "lora_kd"):
        assert len(models[name]["per_seed"]) == len(results["run"]["seeds"])
    wins = sum(kd < alone for kd, alone in zip(models["lora_kd"]["per_seed"],
                                               models["lora_alone"]["per_seed"]))
    assert results["kd_better_on_seeds"] == wins
    assert "Warning" not in output  # no stray warnings or progress bars in the console
    assert "Writing model shards" not in output


def test_only_the_adapters_are_trained_and_counted(quick_run):
    _, results, _ = quick_run
    student, lora = results["configs"]["student"], results["configs"]["lora"]
    width, layers, r = student["n_embd"], student["n_layer"], lora["r"]
    # per block: c_attn (w -> 3w), attn c_proj (w -> w), c_fc (w -> 4w), mlp c_proj (4w -> w)
    per_block = r * ((width + 3 * width) + (width + width) + (width + 4 * width)
                     + (4 * width + width))
    for name in ("lora_alone", "lora_kd"):
        row = results["models"][name]
        assert row["trainable"] == layers * per_block, name
        assert row["parameters"] == results["models"]["base"]["parameters"] + row["trainable"]


def test_the_saved_adapters_reload_on_the_saved_base_to_the_reported_perplexity(quick_run):
    import torch
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import lm_distillation as lm

    from textbrewer.integrations.huggingface import load_pretrained
    output_dir, results, _ = quick_run
    scored = lm.load_data(results["data"]["sequence_length"])["blocks"][
        results["data"]["split"]][:results["data"]["blocks"]["scored"]]
    base_folder = os.path.join(output_dir, results["base_folder"])
    base_ppl = lm.perplexity(load_pretrained(base_folder).model, scored, torch.device("cpu"))
    assert base_ppl == pytest.approx(results["models"]["base"]["perplexity"], rel=1e-6)
    for name in ("lora_alone", "lora_kd"):
        folder = os.path.join(output_dir, results["models"][name]["adapters"][0])
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
        assert "model.safetensors" not in os.listdir(folder)
        model = load_pretrained(folder, base=base_folder).model
        reloaded = lm.perplexity(model, scored, torch.device("cpu"))
        assert reloaded == pytest.approx(results["models"][name]["per_seed"][0], rel=1e-6), name
        assert reloaded != pytest.approx(base_ppl, rel=1e-7), name  # the adapters trained
