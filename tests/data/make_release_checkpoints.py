"""Writes tests/data/release_checkpoints/: runs interrupted half-way by a released version
of this library, kept as test data, so that tests/test_release_checkpoints.py can check
that a checkpoint written before a change still resumes after it, to the same weights.

Run it from a checkout of the release being frozen (the folder it writes is copied into
the current tree), for example::

    git worktree add /tmp/release <commit> && cd /tmp/release
    python tests/data/make_release_checkpoints.py /path/to/current/tests/data/release_checkpoints

For each case it writes ``<case>/cut/`` (the files of the run interrupted after its
checkpoint ``stop_at``: student weights and training states) and ``<case>/expected.pt``
(the module states of the same run left uninterrupted, and the commit that wrote them),
with one torch thread, as the test resumes them.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/

import test_resume  # noqa: E402
import test_schemes_multiphase  # noqa: E402
from textbrewer.utils import seed_everything  # noqa: E402


def _resume_case(kind):
    train, stop_at = test_resume.CASES[kind]

    def run(output_dir, stop=None):
        result = test_resume._run(kind, output_dir, stop_at=stop, **train)
        return None if result is None else [result[0]]
    return run, stop_at


def _scheme_case(name):
    run = test_schemes_multiphase.RUNS[name]
    return (lambda output_dir, stop=None: run(output_dir, stop=stop)), 2


CASES = {
    "general_steps": _resume_case("steps"),
    "general_epochs": _resume_case("epochs"),
    "multitask": _resume_case("multitask"),
    "caching": _resume_case("caching"),
    "adversarial": _scheme_case("adversarial"),
    "mutual": _scheme_case("mutual"),
}


def main(destination):
    # one thread: the expected weights must not depend on the machine's core count (the
    # summation order of a matmul does)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    os.makedirs(destination, exist_ok=True)
    for name, (run, stop_at) in CASES.items():
        with tempfile.TemporaryDirectory() as scratch:
            seed_everything(1234)
            reference = run(os.path.join(scratch, "full"))
            seed_everything(1234)
            assert run(os.path.join(scratch, "cut"), stop=stop_at) is None
            target = os.path.join(destination, name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(scratch, "cut"), os.path.join(target, "cut"))
            torch.save({"states": reference, "stop_at": stop_at, "commit": commit},
                       os.path.join(target, "expected.pt"))
            print(name, sorted(os.listdir(os.path.join(target, "cut"))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "release_checkpoints"))
