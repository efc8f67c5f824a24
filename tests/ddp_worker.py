"""Run by tests/test_distributed.py under torchrun: distils with 2 processes (gloo, CPU).

Usage: torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR [MODE]

MODE ``general`` (default): GeneralDistiller with intermediate matches (test_distributed.py).
MODE ``lm``: CausalLMDistiller on tiny GPT-2 models, uneven lengths, the loss normalised
over the accumulation window and the ranks (test_lm_distributed.py).
MODE ``lm-fsdp2``: the same with teacher and student sharded by FSDP2 (``fully_shard``);
writes the gathered full student weights to ``OUTPUT_DIR/fsdp2_full.pt``, and the student's
``save_pretrained`` folders at each checkpoint to ``OUTPUT_DIR/hf/gs{N}``.
MODE ``lm-fsdp2-cut``: that run, stopped at the first micro-batch after checkpoint 1 (its
training state written); ``lm-fsdp2-resume``: resumed from it (``resume_from='latest'``)
to the end, writing ``fsdp2_full.pt`` (test_lm_distributed.py compares it with ``lm-fsdp2``'s).

The distiller initialises the process group and destroys it when training ends; the worker
checks that it did, and that no gloo thread is left running. Mode ``lm-fsdp2`` gathers the
weights after training, so it initialises the group itself, as a script that uses the group
after training does, and destroys it at the end.
"""
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.testing import TinyTransformer, make_classification_data, tiny_adaptor

GLOBAL_BATCH = 8
MATCHES = [{"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
            "proj": ["linear", 8, 16]},
           {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_ce_mean",
            "weight": 1},
           # features captured by forward hooks on named submodules, under DDP too
           {"module_T": "layers.0", "module_S": "layers.0", "loss": "hidden_mse", "weight": 0.5,
            "proj": ["linear", 8, 16]}]


class Interrupted(Exception):
    """Stops a run half-way (mode lm-fsdp2-cut)."""


def gloo_threads():
    """Names of the gloo threads listed in ``/proc/self/task`` now (Linux; empty where unknown)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                name = handle.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


def gloo_threads_left(grace_s=5.0):
    """The gloo threads still running ``grace_s`` seconds after a group was destroyed.

    Destroying a group joins its threads, but ``pthread_join`` returns when the kernel
    clears the thread's id, a step of the thread's exit that comes before its entry leaves
    ``/proc/self/task``: a listing made at once can still name a joined thread (measured
    with a C loop of create, join, list on this 2-core machine: 2 listings in 20,000, 24 with
    the other core busy). That entry goes within microseconds; a thread that was never
    joined is still listed after the grace period.
    """
    deadline = time.monotonic() + grace_s
    names = gloo_threads()
    while names and time.monotonic() < deadline:
        time.sleep(0.01)
        names = gloo_threads()
    return names


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


def lm_dataset():
    """Causal-LM examples of very different lengths (1..7 valid targets)."""
    generator = torch.Generator().manual_seed(3)
    result = []
    for length in [8, 2, 5, 3, 8, 4, 6, 2, 7, 3, 8, 5, 2, 6, 4, 8] * 2:
        ids = torch.randint(2, 64, (length,), generator=generator)
        labels = ids.clone()
        labels[:1] = -100
        result.append({"input_ids": ids, "labels": labels})
    return result


def lm_collate(examples):
    from textbrewer.cache import pad_collate
    return pad_collate(examples)


def build_lm(output_dir, world_size=1, path="fused", resume_from=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    from textbrewer.distillers import CausalLMDistiller, LMDistillationConfig

    def gpt2(n_layer, n_embd, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2,
                                          vocab_size=64, n_positions=16, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))

    teacher, student = gpt2(2, 32, 1), gpt2(1, 16, 2)
    config = TrainingConfig(device="cpu", output_dir=output_dir, gradient_accumulation_steps=2,
                            ckpt_frequency=2, resume_from=resume_from)
    distiller = CausalLMDistiller(config, DistillationConfig(temperature=1.0,
                                                             hard_label_weight=0.5),
                                  teacher, student,
                                  lm_config=LMDistillationConfig(path=path, chunk_size=8))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    return distiller, student, optimizer


def build_adversarial(output_dir, world_size=1):
    """AdversarialDistiller (a discriminator phase, then the student's): mode 'adversarial'."""
    from textbrewer.schemes import AdversarialDistiller
    torch.manual_seed(0)
    teacher = TinyTransformer(vocab_size=12, hidden_size=16, num_layers=2)
    student = TinyTransformer(vocab_size=12, hidden_size=8, num_layers=1)
    config = TrainingConfig(device="cpu", output_dir=output_dir, gradient_accumulation_steps=2,
                            ckpt_frequency=2)
    torch.manual_seed(1)
    distiller = AdversarialDistiller(config, DistillationConfig(hard_label_weight=1,
                                                                kd_loss_type="kl"),
                                     teacher, student, tiny_adaptor, tiny_adaptor,
                                     input_dim=3, hidden_size=8, adversarial_weight=0.5)
    distiller.discriminator_optimizer = torch.optim.SGD(
        distiller.discriminator.parameters(), lr=0.1, momentum=0.9)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    return distiller, student, optimizer


def main(output_dir, mode="general"):
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    fsdp2 = mode.startswith("lm-fsdp2")
    if fsdp2:  # the group is needed after training: the script owns it
        dist.init_process_group("gloo")
    if mode == "lm" or fsdp2:
        distiller, student, optimizer = build_lm(
            output_dir, world_size, resume_from="latest" if mode == "lm-fsdp2-resume" else None)
        data, collate_fn = lm_dataset(), lm_collate
        if fsdp2:
            from torch.distributed.fsdp import fully_shard
            for model in (distiller.model_T, distiller.model_S):
                for block in model.transformer.h:
                    fully_shard(block)
                # the root's parameters (embeddings, tied LM head) stay gathered after the
                # forward pass: the fused loss uses the head's weight outside the forward
                fully_shard(model, reshard_after_forward=False)
            # the optimizer is built over the sharded (DTensor) parameters
            optimizer = torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9)
    elif mode == "general":
        distiller, student, optimizer = build(output_dir, world_size)
        data, collate_fn = dataset(), None
    elif mode == "adversarial":
        distiller, student, optimizer = build_adversarial(output_dir, world_size)
        data, collate_fn = dataset(), None
    else:
        raise ValueError(f"unknown mode {mode!r}; expected 'general', 'lm', 'lm-fsdp2', "
                         f"'lm-fsdp2-cut', 'lm-fsdp2-resume' or 'adversarial'")
    rank = distiller.runtime.rank
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=sampler,
                        collate_fn=collate_fn)
    calls, wrapped = [], []

    def callback(model, step):
        calls.append(step)
        wrapped.append(type(distiller._trainable).__name__)

    if mode == "lm-fsdp2-cut":
        finished = os.path.join(output_dir, "gs1.train_state.pt")

        def stop_after_checkpoint(module, args, kwargs):
            if os.path.exists(finished):  # every rank: the write ends in a collective
                raise Interrupted

        student.register_forward_pre_hook(stop_after_checkpoint, with_kwargs=True)
    if fsdp2:  # and the student's save_pretrained folders, gathered from the shards
        from textbrewer.integrations.huggingface import SavePretrained
        callback = SavePretrained(os.path.join(output_dir, "hf"), callback=callback)
    try:
        with distiller:
            distiller.train(optimizer, loader, num_epochs=2, max_grad_norm=1.0,
                            callback=callback)
    except Interrupted:
        return  # the group is destroyed once this function's models are gone (below)
    if not fsdp2:
        # the distiller made the group: it is gone, and its threads with it
        if dist.is_initialized():
            raise RuntimeError("train() left the process group it initialised")
        left = gloo_threads_left()
        if left:
            raise RuntimeError(f"gloo threads still running 5 s after train() returned: {left}")
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(output_dir, "fsdp2_full.pt"))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "world_size": distiller.runtime.world_size, "callbacks": calls,
                   "wrapped": wrapped[0] if wrapped else None}, handle)


def destroy_script_group():
    """Destroys the group the script initialised (the FSDP2 modes) and ends the process.

    On torch 2.14.1 the group outlives destroy_process_group() after FSDP2 used it (its gloo
    threads, pt_gloo_runloop and gloo_tcp_loop, were still running 5 s later in 12 runs of 12,
    with main()'s models gone and gc run: something inside torch keeps a reference). Threads
    left into interpreter shutdown abort the process 1 run in 8 ("terminate called without
    an active exception"), so once the outputs are written and flushed this process ends
    without that shutdown. Groups the distiller initialises itself do not have this problem
    (the general and adversarial modes check that no thread is left).
    """
    if not dist.is_initialized():
        return
    gc.collect()
    dist.destroy_process_group()
    if gloo_threads_left(grace_s=1.0):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    destroy_script_group()
