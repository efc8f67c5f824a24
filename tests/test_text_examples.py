"""The text examples run: each is executed at --quick size as a user would, in a subprocess.

They need transformers (the models are ``transformers`` BERTs built from a ``BertConfig``);
without it these tests are skipped.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, output_dir, *arguments, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    # One thread: tiny models gain nothing from two, and two threads per process on a busy
    # 2-core machine (pytest-xdist, other jobs) spin against each other and run ~50x slower
    env.setdefault("OMP_NUM_THREADS", "1")
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--quick", "--output-dir",
         str(output_dir), *arguments],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, (
        f"examples/{script} --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle), completed.stdout


def _check_models(results, stdout, metrics, students):
    models = results["models"]
    assert list(models) == ["teacher"] + students
    teacher = models["teacher"]
    for name, row in models.items():
        for metric in metrics:
            assert 0.0 <= row[metric] <= 1.0, (name, metric, row[metric])
            assert f"{row[metric]:.4f}" in stdout  # the printed table shows the same numbers
        assert row["seconds_per_batch"] > 0 and row["speedup"] > 0
        assert f"{row['parameters']:,d}" in stdout
        if name != "teacher":
            assert row["parameters"] < teacher["parameters"], name
    assert teacher["speedup"] == pytest.approx(1.0)
    assert results["run"]["quick"] is True


def test_text_classification(tmp_path):
    results, stdout = _run("text_classification.py", tmp_path, "--augment")
    students = ["student_alone_L2", "distilled_student_L2", "distilled_augmented_L2"]
    _check_models(results, stdout, ["accuracy"], students)
    assert results["data"]["labels"] == sorted(results["data"]["labels"])
    assert len(results["data"]["labels"]) == 8 and results["data"]["test"] > 0
    assert results["run"]["augment"] is True
    # the reported sizes are those of the architectures written to results.json
    from transformers import BertConfig, BertForSequenceClassification
    from textbrewer.utils import count_parameters
    configs = results["configs"]
    common = dict(vocab_size=configs["vocab_size"], num_labels=configs["num_labels"],
                  max_position_embeddings=configs["max_length"])
    teacher = BertForSequenceClassification(BertConfig(**configs["teacher"], **common))
    student = BertForSequenceClassification(BertConfig(**configs["student"], **common,
                                                       num_hidden_layers=2))
    assert results["models"]["teacher"]["parameters"] == count_parameters(teacher)
    assert results["models"]["distilled_student_L2"]["parameters"] == count_parameters(student)
    for name in ("teacher", *students):
        assert os.listdir(tmp_path / name), f"no checkpoint in {name}/"


def test_ner(tmp_path):
    results, stdout = _run("ner.py", tmp_path)
    _check_models(results, stdout, ["f1", "precision", "recall", "token_accuracy"],
                  ["student_alone_L2", "distilled_student_L2"])
    assert results["data"]["tags"][0] == "O"
    assert {"B-DEF", "B-CALL", "B-ATTR"} <= set(results["data"]["tags"])
    # most tokens are 'O': even the quick teacher gets most of them right
    assert results["models"]["teacher"]["token_accuracy"] > 0.5


def test_ner_over_seeds_is_the_mean_of_the_seeds_own_runs(tmp_path):
    """--seeds 0 1: each seed one whole run in seed{S}/, the top results.json their mean,
    sample std and per-seed wins, the same numbers as the seeds' own files."""
    results, stdout = _run("ner.py", tmp_path, "--seeds", "0", "1")
    runs = []
    for seed in (0, 1):
        with open(tmp_path / f"seed{seed}" / "results.json", encoding="utf-8") as handle:
            runs.append(json.load(handle))
        assert runs[-1]["run"]["seed"] == seed
        assert os.listdir(tmp_path / f"seed{seed}" / "distilled_student_L2")
    assert results["run"]["seeds"] == [0, 1] and "seed" not in results["run"]
    for name, row in results["models"].items():
        for metric in ("f1", "token_accuracy"):
            values = [run["models"][name][metric] for run in runs]
            assert row[f"{metric}_per_seed"] == values
            assert row[metric] == pytest.approx((values[0] + values[1]) / 2)
            assert row[f"{metric}_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert f"{row['f1']:.4f} ± {row['f1_std']:.4f}" in stdout
    alone = results["models"]["student_alone_L2"]["f1_per_seed"]
    distilled = results["models"]["distilled_student_L2"]
    assert distilled["vs_student_alone_L2"] == {
        "better": sum(d > a for d, a in zip(distilled["f1_per_seed"], alone)),
        "tied": sum(d == a for d, a in zip(distilled["f1_per_seed"], alone)),
        "worse": sum(d < a for d, a in zip(distilled["f1_per_seed"], alone))}


def test_text_seeds_must_be_distinct(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "ner.py"), "--quick", "--seeds", "1",
         "1", "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert completed.returncode == 2 and "--seeds must be distinct" in completed.stderr
    assert not os.listdir(tmp_path)


def test_text_classification_scores_the_validation_split_when_asked(tmp_path):
    test, _ = _run("text_classification.py", tmp_path / "test")
    validation, stdout = _run("text_classification.py", tmp_path / "validation", "--split",
                              "validation", "--alone-lr", "3e-3")
    assert "(validation split)" in validation["data"]["source"]
    assert validation["run"]["alone_lr"] == 3e-3 and validation["run"]["distil_lr"] == 1e-3
    assert validation["data"]["train"] == test["data"]["train"]  # the same training set
    assert validation["data"]["test"] != test["data"]["test"]


def test_span_extraction_both_ways_of_summing_heads(tmp_path):
    results, stdout = _run("span_extraction.py", tmp_path, "--kd-over-heads", "both")
    _check_models(results, stdout, ["exact_match", "f1"],
                  ["student_alone", "distilled_student", "distilled_student_last_head"])
    for name, row in results["models"].items():
        assert row["exact_match"] <= row["f1"] + 1e-9, name  # an exact match has F1 = 1
    assert results["run"]["kd_over_heads"] == "both"
    assert results["data"]["train"] > 0 and results["data"]["test"] > 0


def test_text_data_readers(tmp_path):
    """The --data readers on small files in the real formats (SST-2, CoNLL-2003, SQuAD)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import _text_data as data_lib
    finally:
        sys.path.pop(0)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\nhide new secretions \t0\nthe greatest musicians \t1\n",
                   encoding="utf-8")
    assert data_lib.read_tsv_classification(str(tsv))["rows"] == [
        ("hide new secretions ", "0"), ("the greatest musicians ", "1")]
    conll = tmp_path / "train.txt"
    conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                     "German JJ B-NP B-MISC\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n",
                     encoding="utf-8")
    sentences = data_lib.read_conll(str(conll))
    assert sentences == [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
                         {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    assert data_lib.chunks(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == {
        ("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5)}
    squad = tmp_path / "dev.json"
    context = "Super Bowl 50 was played at Levi's Stadium in Santa Clara."
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": [
        {"question": "Where was it played?", "answers": [
            {"text": "Levi's Stadium", "answer_start": context.index("Levi")}]}]}]}]}),
        encoding="utf-8")
    [example] = data_lib.read_squad(str(squad))
    assert example["context"][example["start"]:example["end"] + 1] == ["levi", "'", "s",
                                                                        "stadium"]
