"""TensorBoard: the loss terms as in TextBrewer 0.2.1, plus the scheduled weights, the
temperature, the learning rates and the throughput after each optimizer step; PNG curves."""
import importlib.util

import pytest
import torch

from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.logs import plot_curves, read_scalars
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tb")
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1)
    data = make_classification_data(16, length=6, vocab_size=12)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in data.items()} for i in range(16)],
                                         batch_size=4)
    distiller = GeneralDistiller(
        TrainingConfig(device="cpu", output_dir=str(tmp_path / "out"),
                       log_dir=str(tmp_path / "tb"), log_steps=3),
        DistillationConfig(temperature=3, kd_loss_weight_scheduler="linear_decay",
                           hard_label_weight=0.5), teacher, student, tiny_adaptor, tiny_adaptor)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_epochs=2,
                        scheduler_class=torch.optim.lr_scheduler.StepLR,
                        scheduler_args={"step_size": 2, "gamma": 0.5})
    return tmp_path / "tb"


def test_step_scalars_follow_the_schedules(run):
    scalars = read_scalars(str(run))
    # one loss point per micro-batch, as 0.2.1
    assert [step for step, _ in scalars["scalar/total_loss"]] == list(range(8))
    # after optimizer step k (micro-batch k-1): weight 1 - k/8, lr 0.1 · 0.5^(k // 2)
    def values(tag):
        assert [step for step, _ in scalars[tag]] == list(range(8))
        return [value for _, value in scalars[tag]]
    assert values("scalar/kd_loss_weight") == pytest.approx([1 - k / 8 for k in range(1, 9)])
    assert values("scalar/hard_label_weight") == pytest.approx([0.5] * 8)
    assert values("scalar/temperature") == pytest.approx([3.0] * 8)
    assert values("scalar/lr/group0") == pytest.approx([0.1 * 0.5 ** (k // 2)
                                                        for k in range(1, 9)], rel=1e-6)
    assert all(value > 0 for _, value in scalars["scalar/samples_per_second"])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_curves_writes_a_png(run, tmp_path):
    path = tmp_path / "curves.png"
    tags = plot_curves(str(run), str(path), ["scalar/total_loss", "scalar/kd_loss_weight"])
    assert tags == ["scalar/total_loss", "scalar/kd_loss_weight"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no scalars"):
        plot_curves(str(run), str(tmp_path / "x.png"), ["scalar/nothing"])
