"""Run by tests/test_distributed_faults.py under torchrun (2 gloo processes).

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_faults_worker.py MODE OUTPUT_DIR

MODE ``unused``: the student has a parameter its loss does not use (a pooler the adaptor
ignores), as TextBrewer 0.2.1 allowed. ``nan``: only rank 1 sees a NaN input. ``barrier``:
the callback synchronises the processes inside (an evaluation like 0.2.1's distributed NER
example's). Each process writes what happened to OUTPUT_DIR/rank{r}.txt.

The worker initialises the process group itself (as 0.2.1 scripts do) and destroys it at
the end, also after an error; the distiller leaves it alone but drops its DDP wrappers when
training ends, so destroying the group stops its gloo threads (checked).
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig


class StudentWithPooler(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.pooler = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x), self.pooler(x)


def adaptor(batch, outputs):
    return {"logits": outputs[0] if isinstance(outputs, tuple) else outputs}


def main(mode, output_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        run(mode, output_dir)
    finally:
        dist.destroy_process_group()
    from ddp_worker import gloo_threads_left  # this folder is the script's, first on sys.path
    left = gloo_threads_left()
    if left:
        raise RuntimeError(f"gloo threads still running 5 s after destroy_process_group(): "
                           f"{left}")


def run(mode, output_dir):
    rank = dist.get_rank()
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    student = StudentWithPooler() if mode == "unused" else nn.Linear(4, 3)
    data = [(torch.randn(2, 4),) for _ in range(6)]
    if mode == "nan" and rank == 1:
        data[1] = (torch.full((2, 4), float("nan")),)
    calls = []

    def callback(model, step):
        if mode == "barrier":
            dist.barrier()
        calls.append(step)

    config = TrainingConfig(device="cpu", output_dir=output_dir, ckpt_steps=2,
                            check_finite_every_step=mode == "nan")
    distiller = BasicDistiller(config, DistillationConfig(), teacher, student, adaptor, adaptor)
    try:
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), data, num_steps=4,
                            callback=callback)
        outcome = f"finished callbacks={calls}"
        if dist.group.WORLD is None:
            outcome = "train() destroyed the script's process group"
    except Exception as error:  # the test reads what each process saw
        outcome = f"{type(error).__name__}: {error}"
    with open(os.path.join(output_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
