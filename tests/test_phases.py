"""Phase options of the loop (textbrewer.training.phase): a module frozen for a phase, a
phase every k steps, a phase k times per step, and their checks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textbrewer import BasicTrainer, TrainingConfig
from textbrewer.training.phase import Phase


class Net(nn.Module):
    """(B, 4) -> {'logits': (B, 3), 'loss'}, with batch norm (running statistics)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Linear(8, 3))

    def forward(self, x, labels):
        logits = self.body(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def adaptor(batch, outputs):
    return {"losses": [outputs["loss"]]}


def _loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader([{"x": x[i], "labels": y[i]} for i in range(24)],
                                       batch_size=4, shuffle=True)


class WithCritic(BasicTrainer):
    """The student on its labels, and before it a critic phase that reads the student."""

    def __init__(self, config, student, **phase_options):
        super().__init__(config, student, adaptor)
        torch.manual_seed(5)
        self.critic = nn.Linear(3, 1)
        self.critic_optimizer = torch.optim.SGD(self.critic.parameters(), lr=0.1)
        self.phase_options = phase_options
        self.critic_losses = 0

    def critic_loss(self, batch, args):
        self.critic_losses += 1
        logits = self.model_S(batch["x"], batch["labels"])["logits"]
        return self.critic(logits).pow(2).mean()

    def phases(self, student_phase):
        return [Phase("critic", self.critic_optimizer, self.critic_loss, [self.critic],
                      **self.phase_options), student_phase]


def _train(tmp_path, distiller_class=None, **options):
    torch.manual_seed(1)
    student = Net()
    config = TrainingConfig(device="cpu", output_dir=str(tmp_path), ckpt_steps=100)
    distiller = (distiller_class or WithCritic)(config, student, **options)
    steps = []
    if hasattr(distiller, "critic_optimizer"):
        distiller.critic_optimizer.register_step_post_hook(lambda *a: steps.append(1))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(2)
    with distiller:
        distiller.train(optimizer, _loader(), num_steps=9)
    return student.state_dict(), len(steps), distiller


def _alone(tmp_path):
    return _train(tmp_path, lambda config, student: BasicTrainer(config, student, adaptor))[0]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_modules_keep_their_parameters_and_batch_norm_statistics(tmp_path, frozen):
    class FreezingCritic(WithCritic):
        def phases(self, student_phase):
            return [Phase("critic", self.critic_optimizer, self.critic_loss, [self.critic],
                          frozen=[self.model_S] if frozen else []), student_phase]

    trained, steps, distiller = _train(tmp_path / "run", FreezingCritic)
    alone = _alone(tmp_path / "alone")
    assert steps == 9 and distiller.critic_losses == 9
    # frozen: eval mode (no dropout draw, BN statistics kept) and no gradient into the
    # student, so the student trains bit for bit as without the phase; not frozen, its
    # running statistics move in the critic's forwards too
    assert _same(trained, alone) == frozen
    assert all(p.requires_grad for p in distiller.model_S.parameters())
    assert distiller.model_S.training  # put back in train mode


@pytest.mark.parametrize("every, expected", [(1, 9), (2, 5), (3, 3), (4, 3)])
def test_a_phase_every_k_steps(tmp_path, every, expected):
    _, steps, distiller = _train(tmp_path, every=every)
    assert steps == expected == distiller.critic_losses  # steps 1, 1 + k, 1 + 2k, ...


def test_a_phase_k_times_per_step(tmp_path):
    _, steps, distiller = _train(tmp_path, repeat=3)
    assert steps == 27 and distiller.critic_losses == 27


@pytest.mark.parametrize("options, message", [
    (dict(every=0), r"phase 'critic': every must be an integer >= 1, got 0"),
    (dict(repeat=1.5), r"phase 'critic': repeat must be an integer >= 1, got 1.5"),
    (dict(frozen=nn.Linear(2, 2)), r"phase 'critic': frozen must be a list of nn.Module"),
])
def test_phase_options_are_checked_before_training(tmp_path, options, message):
    torch.manual_seed(1)
    student = Net()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = WithCritic(TrainingConfig(device="cpu", output_dir=str(tmp_path)), student,
                           **options)
    with pytest.raises((ValueError, TypeError), match=message):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), _loader(), num_steps=2)
    assert _same(student.state_dict(), before)
