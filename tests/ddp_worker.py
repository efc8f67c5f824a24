"""Run by tests/test_distributed.py under torchrun: distils with 2 processes (gloo, CPU).

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR
"""
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler

from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

GLOBAL_BATCH = 8
MATCHES = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
            "proj": ["linear", 8, 16]},
           {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce_mean",
            "weight": 1}]


def dataset():
    data = make_classification_data(32, length=6, vocab_size=12, seed=5, padded=False)
    return [{key: value[i] for key, value in data.items()} for i in range(32)]


def build(output_dir, world_size=1):
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1)
    config = TrainingConfig(device="cpu", output_dir=output_dir, gradient_accumulation_steps=2,
                            ckpt_frequency=2)
    distiller = GeneralDistiller(config, DistillationConfig(hard_label_weight=1,
                                                            intermediate_matches=MATCHES),
                                 teacher, student, tiny_adaptor, tiny_adaptor)
    # SGD, not Adam: Adam turns the key bias's round-off-sized gradients (exactly zero in
    # exact arithmetic) into lr-sized steps, which no two summation orders reproduce.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    return distiller, student, optimizer


def main(output_dir):
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    distiller, student, optimizer = build(output_dir, world_size)
    rank = distiller.runtime.rank
    sampler = DistributedSampler(dataset(), num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(dataset(), batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    calls = []
    with distiller:
        distiller.train(optimizer, loader, num_epochs=2, max_grad_norm=1.0,
                        callback=lambda model, step: calls.append(step))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "world_size": distiller.runtime.world_size, "callbacks": calls,
                   "wrapped": type(distiller._trainable).__name__}, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
