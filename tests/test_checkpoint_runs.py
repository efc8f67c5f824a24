"""Several runs in one output_dir: a fresh run's resumable states are its own, and weights
rewritten by another run never pair with an older training state."""
import os

import pytest
import torch

from textbrewer import BasicDistiller, CheckpointError, DistillationConfig, TrainingConfig
from textbrewer.checkpoint import atomic_save, load_state, state_paths_newest_first
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor


def _run(output_dir, steps, lr=0.1, resume_from=None, **train):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=1)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1)
    data = make_classification_data(16, length=6, vocab_size=12)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in data.items()} for i in range(16)],
                                         batch_size=4)
    distiller = BasicDistiller(TrainingConfig(device="cpu", output_dir=str(output_dir),
                                              ckpt_steps=2, resume_from=resume_from, **train),
                               DistillationConfig(), teacher, student, tiny_adaptor,
                               tiny_adaptor)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=lr), loader, num_steps=steps)
    return student


def test_a_fresh_run_sets_the_older_runs_later_states_aside(tmp_path, caplog):
    _run(tmp_path, steps=6)
    assert [os.path.basename(p) for p in state_paths_newest_first(str(tmp_path))] == \
        ["gs6.train_state.pt"]
    with caplog.at_level("WARNING", logger="textbrewer"):
        _run(tmp_path, steps=4, lr=0.05)  # another run, same folder, fewer steps
    # the new run kept its own newest state; the old one was moved, not deleted
    assert [os.path.basename(p) for p in state_paths_newest_first(str(tmp_path))] == \
        ["gs4.train_state.pt"]
    assert os.listdir(tmp_path / "superseded_train_states") == ["gs6.train_state.pt"]
    assert any("moved 1 of them" in r.getMessage() for r in caplog.records)
    assert load_state(str(tmp_path / "gs4.train_state.pt"))["optimizer"]["param_groups"][0][
        "lr"] == 0.05


def test_weights_rewritten_by_another_run_do_not_pair_with_the_old_state(tmp_path):
    other = _run(tmp_path, steps=4, keep_train_states=None)
    # another run's weights of the same size, written the way the library writes them
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(1)
    atomic_save(other.state_dict(), str(tmp_path / "gs4.pkl"))
    state = torch.load(tmp_path / "gs4.train_state.pt", weights_only=True)
    assert os.path.getsize(tmp_path / "gs4.pkl") == state["student_file_bytes"]
    with pytest.raises(CheckpointError, match="were rewritten after the state was saved"):
        load_state(str(tmp_path / "gs4.train_state.pt"))
    # 'latest' passes over it to the complete pair of step 2
    student = _run(tmp_path, steps=4, resume_from="latest", keep_train_states=None)
    reference = _run(tmp_path / "reference", steps=4)
    for key, value in reference.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
