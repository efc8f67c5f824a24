"""Checkpoints written by an earlier release resume in this one, to the same weights.

tests/data/release_checkpoints/ holds runs interrupted half-way, written by the commit
recorded in each ``expected.pt`` (tests/data/make_release_checkpoints.py made them), and
the module states that the same runs reached uninterrupted in that release. Resuming them
here must end on those states, bit for bit on the machine that wrote them and to float
rounding on another CPU: the training-state format, the RNG streams and
the arithmetic of a resumed run are all part of the compatibility promise.
"""
import os
import shutil

import pytest
import torch

import test_resume
import test_schemes_multiphase
from textbrewer.checkpoint import latest_state_path
from textbrewer.utils import seed_everything

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "release_checkpoints")
CASES = {"general_steps": "steps", "general_epochs": "epochs", "multitask": "multitask",
         "caching": "caching", "adversarial": None, "mutual": None}


#: the largest difference a run may end at on a CPU other than the one that wrote its files
CROSS_CPU_ATOL = {"adversarial": 5e-4, "caching": 1e-4}


def _resume(name, output_dir):
    kind = CASES[name]
    if kind is None:
        return test_schemes_multiphase.RUNS[name](output_dir, resume="latest", init_seed=77)
    train, _ = test_resume.CASES[kind]
    weights, _ = test_resume._run(kind, output_dir, resume_from="latest", init_seed=77, **train)
    return [weights]


def test_every_case_has_its_files():
    assert sorted(os.listdir(DATA)) == sorted(CASES)


@pytest.fixture
def one_thread():
    """The expected weights were computed with one thread (the summation order of a
    matmul, and so the last bits, depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_release_checkpoint_resumes_to_the_same_weights(tmp_path, name, one_thread):
    expected = torch.load(os.path.join(DATA, name, "expected.pt"), weights_only=True)
    output_dir = tmp_path / name
    shutil.copytree(os.path.join(DATA, name, "cut"), output_dir)
    latest = latest_state_path(str(output_dir))
    assert os.path.basename(latest) == f"gs{expected['stop_at']}.train_state.pt"
    seed_everything(999)  # everything must come from the files
    resumed = _resume(name, output_dir)
    assert len(resumed) == len(expected["states"])
    for reference, state in zip(expected["states"], resumed):
        assert reference.keys() == state.keys()
        for key in reference:
            message = f"{name}: {key} differs from the run of commit {expected['commit'][:7]}"
            if not reference[key].is_floating_point():
                assert torch.equal(reference[key], state[key]), message
            elif not torch.equal(reference[key], state[key]):
                # The last bits of a float depend on the CPU's vector instructions: the files
                # were written on an AMD EPYC, and on an Intel Xeon the same code ends up to
                # 1.2e-4 away (adversarial), 1.2e-5 (caching), < 1e-7 (the others). The
                # second half of each run moves the weights 3e-3 to 1.5e-2, 30 to 800 times
                # these tolerances, so a resume that lost the RNG streams, the data position
                # or the optimizer state still fails (tests/test_resume.py: bitwise, one CPU).
                torch.testing.assert_close(state[key], reference[key], rtol=0,
                                           atol=CROSS_CPU_ATOL.get(name, 1e-5), msg=message)
