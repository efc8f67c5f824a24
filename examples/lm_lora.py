"""LoRA with and without knowledge distillation: adapt a pre-trained byte-level GPT-2 with
rank-r adapters, on labels alone or with a teacher.

The data are those of ``examples/lm_distillation.py`` (imported from it, not copied): the
docstrings of Python's standard library at the byte level (vocabulary 256), each
top-level package in the train (80 %), validation (10 %) or test split (10 %) by a CRC-32
of its name, blocks of ``--sequence-length`` bytes. The training blocks are in package
order; their first half pre-trains the student's base, the second half is the adaptation
data of the LoRA runs. Perplexity is per byte on held-out packages.

Runs (GPT-2 models from ``transformers.GPT2Config``, the sizes of lm_distillation.py):

1. the teacher: width 96, 3 layers, trained on the whole training split (next-byte CE);
2. the student's base: width 48, 2 layers, pre-trained on the first half for
   ``--base-steps``, then frozen; saved with ``save_pretrained``;
3. per seed (the adapters' initial weights and the data order), two LoRA students on the
   same frozen base, rank ``--rank`` (alpha ``2 · rank``) on every linear layer
   (``c_attn``, ``c_proj``, ``c_fc``), trained for ``--steps`` on the second half with
   ``CausalLMDistiller``, the optimizer holding only the adapters
   (``trainable_parameters``, checked with ``check_optimizer_params``):

   a. ``lora_alone``: labels alone (``kd_loss_weight=0``, no teacher: the cross-entropy);
   b. ``lora_kd``: ``1 · KL(teacher ‖ student) + 1 · CE`` at τ = 1 (lm_distillation.py's
      choice), same init, data and steps.

   Each side has its own learning rate (``--lr-alone``, ``--lr-kd``), chosen with the same
   grid and budget on the validation split (``--split validation --lr-grid ...``). The
   adapters are written at the end with ``SavePretrained`` (``{run}/hf/gs{steps}``:
   ``adapter_model.safetensors`` + ``adapter_config.json``), reloadable on the base folder
   with ``load_pretrained(folder, base=base_folder)``.

It prints the table (mean ± std over the seeds, the teacher and the base for reference)
and writes ``{output_dir}/results.json``.

Run:
    python examples/lm_lora.py                     # 3 seeds, a few CPU-minutes
    python examples/lm_lora.py --quick             # seconds (used by the tests)
    python examples/lm_lora.py --split validation --seeds 0 \\
        --lr-grid 1e-3 3e-3 1e-2                   # choose each side's learning rate
"""
from __future__ import annotations

import collections
import copy
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import lm_distillation as lm  # noqa: E402  (the data, models and perplexity of the LM example)

from textbrewer import (CausalLMDistiller, DistillationConfig,  # noqa: E402
                        LMDistillationConfig)
from textbrewer.integrations.huggingface import (SavePretrained,  # noqa: E402
                                                 check_optimizer_params, lora_student,
                                                 save_pretrained_atomic, trainable_parameters)
from textbrewer.utils import count_parameters  # noqa: E402

try:
    from transformers.utils import logging as transformers_logging
    import peft  # noqa: F401
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers and peft: pip install -e '.[peft]'")

TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]  # every linear layer of GPT-2's blocks
METHODS = ("lora_alone", "lora_kd")


def train_lora(student: torch.nn.Module, teacher: Optional[torch.nn.Module], blocks, args,
               device, lr: float, seed: int, run_dir: str) -> SavePretrained:
    """``args.steps`` of ``CausalLMDistiller`` on the adapters only; labels alone without a
    teacher. Returns the saver that wrote ``{run_dir}/hf/gs{steps}``."""
    adapters = trainable_parameters(student)
    # the LM example's AdamW and warm-up / decay schedule, over the adapters alone
    optimizer, schedule = lm.optimizer_and_schedule(torch.nn.ParameterList(adapters), lr,
                                                    args.steps)
    check_optimizer_params(optimizer, student)  # no frozen base parameter in it
    distill_config = DistillationConfig(temperature=1.0,
                                        kd_loss_weight=0.0 if teacher is None else 1.0,
                                        hard_label_weight=1.0)
    distiller = CausalLMDistiller(lm.train_config(run_dir, device, args.steps, seed),
                                  distill_config, model_T=teacher, model_S=student,
                                  lm_config=LMDistillationConfig(divergence="forward_kl"))
    saver = SavePretrained(os.path.join(run_dir, "hf"))
    common.fit(distiller, optimizer, lm.train_loader(blocks, args.batch_size, seed),
               num_steps=args.steps, max_grad_norm=1.0, callback=saver, **schedule)
    return saver


def parse_args(argv=None):
    parser = common.ExampleParser(__doc__, "./output_lm_lora",
                                  quick_help="a much smaller run, for tests (seconds)",
                                  output_help="the teacher, the base, the adapters and "
                                              "results.json go here")
    parser.add_quick_argument("--steps", 10, 250, "optimizer steps of each LoRA run, alone "
                              "and with KD: the same budget for both")
    parser.add_quick_argument("--base-steps", 20, 400, "pre-training steps of the base")
    parser.add_quick_argument("--teacher-steps", 20, 500, "optimizer steps of the teacher")
    parser.add_seeds(help="LoRA seeds (adapter init, data order)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split the table scores: choose settings on 'validation'")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha = 2 r)")
    parser.add_argument("--lr-alone", type=float, default=3e-2,
                        help="learning rate of the LoRA-alone runs (chosen on validation)")
    parser.add_argument("--lr-kd", type=float, default=3e-2,
                        help="learning rate of the LoRA + KD runs (chosen on validation)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None,
                        help="tuning: run both methods at each of these learning rates "
                             "(instead of --lr-alone / --lr-kd)")
    parser.add_argument("--base-lr", type=float, default=3e-3)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_threads("torch CPU threads (default 1)")
    parser.add_device()
    parser.require_positive("rank", "batch_size")
    args = parser.parse_args(argv)
    if args.sequence_length < 2:
        parser.error("--sequence-length must be at least 2 (a byte and the next one)")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(args.threads, quiet=True)
    transformers_logging.set_verbosity_error()  # no progress bars while saving
    transformers_logging.disable_progress_bar()
    # peft asks transformers a deprecated question when it wraps a model; not ours to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    device = torch.device(args.device)
    data = lm.load_data(args.sequence_length)
    blocks = data["blocks"]
    train = blocks["train"][:512] if args.quick else blocks["train"]
    half = train.size(0) // 2
    pretrain, adapt = train[:half], train[half:]
    scored = blocks[args.split][:64] if args.quick else blocks[args.split]
    print(f"standard-library docstrings, byte level: {train.size(0)} training blocks of "
          f"{args.sequence_length} ({half} pre-train the base, {adapt.size(0)} adapt); "
          f"scoring {scored.size(0)} {args.split} blocks; device {device}", flush=True)
    models: Dict[str, Dict[str, Any]] = {}

    teacher = lm.gpt2(lm.TEACHER_CONFIG, args.sequence_length, 1000).to(device)
    lm.train(teacher, lm.train_loader(train, args.batch_size, 1000), _lm_args(), device,
             args.teacher_steps, args.teacher_lr, 1000, os.path.join(args.output_dir, "teacher"))
    teacher.eval()
    models["teacher"] = {"perplexity": lm.perplexity(teacher, scored, device),
                         "parameters": count_parameters(teacher), "trainable": 0}
    print(f"  teacher: perplexity {models['teacher']['perplexity']:.3f}", flush=True)

    base = lm.gpt2(lm.STUDENT_CONFIG, args.sequence_length, 2000).to(device)
    lm.train(base, lm.train_loader(pretrain, args.batch_size, 2000), _lm_args(), device,
             args.base_steps, args.base_lr, 2000, os.path.join(args.output_dir, "base"))
    base_folder = save_pretrained_atomic(base, os.path.join(args.output_dir, "base", "hf"))
    models["base"] = {"perplexity": lm.perplexity(base, scored, device),
                      "parameters": count_parameters(base), "trainable": 0}
    print(f"  base (frozen): perplexity {models['base']['perplexity']:.3f}", flush=True)

    grid = args.lr_grid or [None]
    scores: Dict[str, List[float]] = collections.defaultdict(list)
    rows: Dict[str, Dict[str, Any]] = {}
    for seed in args.seeds:
        for lr_choice in grid:
            for method in METHODS:
                lr = lr_choice or (args.lr_alone if method == "lora_alone" else args.lr_kd)
                name = method if lr_choice is None else f"{method}@lr={lr:g}"
                clock = time.perf_counter()
                torch.manual_seed(seed)  # the adapters' A matrices; B starts at zero
                student = lora_student(copy.deepcopy(base), r=args.rank, alpha=2 * args.rank,
                                       target_modules=TARGET_MODULES)
                run_dir = os.path.join(args.output_dir, name, f"seed{seed}")
                saver = train_lora(student, teacher if method == "lora_kd" else None, adapt,
                                   args, device, lr, seed, run_dir)
                scores[name].append(lm.perplexity(student, scored, device))
                rows.setdefault(name, {"method": method, "lr": lr, "adapters": [],
                                       "parameters": count_parameters(student),
                                       "trainable": sum(p.numel() for p in
                                                        trainable_parameters(student))})
                rows[name]["adapters"].append(os.path.relpath(saver.saved[-1],
                                                              args.output_dir))
                print(f"  seed {seed} {name}: perplexity {scores[name][-1]:.3f} "
                      f"({time.perf_counter() - clock:.0f} s)", flush=True)
    for name, row in rows.items():
        mean, std = common.mean_std(scores[name])
        models[name] = {**row, "perplexity": mean, "perplexity_std": std,
                        "per_seed": scores[name]}

    results: Dict[str, Any] = {"models": models}
    if args.lr_grid is None:
        wins = common.better_tied_worse(scores["lora_kd"], scores["lora_alone"],
                                        higher_is_better=False)
        results["kd_better_on_seeds"] = wins[0]
        results["kd_change"] = models["lora_kd"]["perplexity"] - models["lora_alone"][
            "perplexity"]
    results["configs"] = {"teacher": dict(lm.TEACHER_CONFIG, n_positions=args.sequence_length),
                          "student": dict(lm.STUDENT_CONFIG, n_positions=args.sequence_length),
                          "lora": {"r": args.rank, "alpha": 2 * args.rank,
                                   "target_modules": TARGET_MODULES, "dropout": 0.0}}
    results["base_folder"] = os.path.relpath(base_folder, args.output_dir)
    results["data"] = {"split": args.split, "sequence_length": args.sequence_length,
                       "blocks": {"pretrain": half, "adapt": adapt.size(0),
                                  "scored": scored.size(0)}}
    results["run"] = common.run_record(args, started)

    print()
    seeds = (f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1
             else f"seed {args.seeds[0]}")
    print(f"{args.split} split, perplexity per byte, {seeds}:")
    print(f"{'model':<26}{'perplexity':>18}{'parameters':>12}{'trained':>10}")
    for name, row in models.items():
        print(f"{name:<26}{common.pm(row['perplexity'], row.get('perplexity_std', 0.0), 10, 3)}"
              f"{row['parameters']:>12,d}{row['trainable']:>10,d}")
    if args.lr_grid is None:
        print(f"LoRA + KD changed the perplexity of LoRA alone by {results['kd_change']:+.3f} "
              f"(better on {results['kd_better_on_seeds']} of {len(args.seeds)} seeds); "
              f"{results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


def _lm_args():
    """The options ``lm_distillation.train`` reads, for its cross-entropy-only runs."""
    return lm.parse_args(["--quick"])


if __name__ == "__main__":
    main()
