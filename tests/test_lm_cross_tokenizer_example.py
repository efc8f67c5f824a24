"""examples/lm_cross_tokenizer.py runs (--quick) as a user would run it, in a subprocess,
and its students reload from their checkpoints with the perplexity the table reports."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("teacher", "student_alone", "distilled_span", "distilled_uld")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    output_dir = tmp_path_factory.mktemp("lm_cross")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_cross_tokenizer.py"), "--quick",
         "--output-dir", str(output_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (
        f"examples/lm_cross_tokenizer.py --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    return output_dir, results, completed.stdout


def test_the_table_has_every_model_with_a_sane_score(quick_run):
    _, results, stdout = quick_run
    models = results["models"]
    assert set(models) == set(MODELS)
    for name, row in models.items():
        value = row["perplexity_per_byte"]
        # above 1, and far below a uniform guess over the 256 byte values
        assert math.isfinite(value) and 1.0 < value < 256, name
        assert f"{value:.4f}" in stdout, name
        if name.startswith("distilled_"):
            assert sum(row["better_tied_worse"]) == len(results["run"]["seeds"])
    assert results["tokenizers"]["teacher"]["kind"] != results["tokenizers"]["student"]["kind"]
    assert results["tokenizers"]["teacher"]["vocab_size"] != \
        results["tokenizers"]["student"]["vocab_size"]


def test_the_alignment_pairs_most_of_the_text(quick_run):
    _, results, _ = quick_run
    alignment = results["alignment"]
    assert alignment["student_tokens_in_groups"] >= 0.9 * alignment["student_tokens"]
    assert alignment["one_to_one"] > 0.5
    assert alignment["teacher_tokens_per_group"] >= 1 and \
        alignment["student_tokens_per_group"] >= 1


def test_a_distilled_student_reloads_with_its_score(quick_run):
    output_dir, results, _ = quick_run
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import lm_cross_tokenizer as example
    finally:
        sys.path.pop(0)
    from textbrewer.distillers.lm.cross_tokenizer import CrossTokenizerCollator
    from textbrewer.testing import train_tokenizer
    run = results["run"]
    data = example.load_data(240)
    train = data["train"][:400]
    tokenizer_T = train_tokenizer("byte_bpe", train, 2000)
    tokenizer_S = train_tokenizer(example.STUDENT_TOKENIZER, train, 1000)
    collate = CrossTokenizerCollator(tokenizer_T, tokenizer_S, max_length=run["max_tokens"])
    config = results["configs"]["student"]
    student = example.gpt2({k: v for k, v in config.items() if k != "n_positions"},
                           tokenizer_S.get_vocab_size(), config["n_positions"], 0)
    weights = os.path.join(output_dir, "distilled_span", "seed0", f"gs{run['steps']}.pkl")
    student.load_state_dict(torch.load(weights, map_location="cpu"))
    scored = data["test"][:results["data"]["scored_pieces"]]
    value = example.perplexity_per_byte(student, scored, collate, "student",
                                        torch.device("cpu"))
    assert value == pytest.approx(results["models"]["distilled_span"]["per_seed"][0],
                                  rel=1e-5)


def test_a_loaded_teacher_gives_the_same_table(quick_run, tmp_path):
    """--teacher-weights loads the first run's teacher instead of training it: the same
    teacher, so the same scores for every model; --alone-lr moves only the baseline."""
    output_dir, results, _ = quick_run
    steps = results["run"]["teacher_steps"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "lm_cross_tokenizer.py"), "--quick",
         "--output-dir", str(tmp_path), "--alone-lr", "1e-3",
         "--teacher-weights", str(output_dir / "teacher" / f"gs{steps}.pkl")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        again = json.load(handle)["models"]
    for name in ("teacher", "distilled_span", "distilled_uld"):
        assert again[name]["per_seed"] == results["models"][name]["per_seed"], name
    assert again["student_alone"]["per_seed"] != results["models"]["student_alone"]["per_seed"]
    assert not os.path.exists(tmp_path / "teacher")  # nothing trained for the teacher
