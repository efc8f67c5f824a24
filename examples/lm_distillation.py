"""Distil a GPT-2-style language model into a smaller one, on real English text.

The text is the docstrings of Python's own standard library, collected by importing each
module (``pkgutil`` finds them, ``inspect.getdoc`` reads them): every top-level module and
package of the running Python and their submodules, in sorted order (``antigravity``,
``this``, ``idlelib``, ``tkinter``, ``turtle``, ``turtledemo``, ``lib2to3``, ``ensurepip``
and the test suites are left out), then per module its own docstring and those of its public
classes, functions and methods defined there. A docstring seen before (re-exports,
aliases) is skipped, so no text appears twice. It ships with every Python and needs no
download; its exact content follows the Python version and the C extensions built into it.
Each top-level package goes, with all its submodules and by a CRC-32 of its name, to the
training (80 %), validation (10 %) or test split (10 %): held-out text comes from modules
never seen in training.

Tokenizer: **byte level**, built here. The ids are the UTF-8 bytes of the text (vocabulary
256); the NUL byte, which no docstring contains, separates docstrings. Each split is one
stream cut into blocks of ``--sequence-length`` bytes; the model is trained and scored on
predicting every byte of a block from the bytes before it. Perplexity is per byte: exp of
the mean cross-entropy over the predicted positions of the split.

Runs (GPT-2 models built from ``transformers.GPT2Config``, trained from scratch):

1. the teacher: width 96, 3 layers, 4 heads, trained on the next-byte cross-entropy for
   ``--teacher-steps`` optimizer steps;
2. per seed, the student alone: width 48, 2 layers, 2 heads, cross-entropy only, for
   ``--steps`` steps: the baseline;
3. per seed, the distilled student: the same architecture from the same initial weights,
   the same data order and ``--steps``, trained with ``CausalLMDistiller`` on
   ``1 · D(teacher ‖ student) + hard_label_weight · CE`` over the same tokens (D: the first
   of ``--divergences``, forward KL by default, τ = 1, ``--hard-label-weight`` 1; chosen
   on the validation split, see examples/README.md);
4. optionally (``--from-cache``): the teacher's top-k next-byte distribution is written once
   with ``textbrewer.cache.write_teacher_cache``, and the student is trained from that
   cache with ``model_T=None`` (no teacher in memory during training).

All of them use the one distiller: runs 1 and 2 are ``CausalLMDistiller`` with
``kd_loss_weight=0`` and no teacher (then it trains on the cross-entropy alone, normalised
the same way), so the only difference between runs 2 and 3 is the KD term.

It prints held-out perplexity (mean ± std over the seeds), parameter counts and the
inference speed-up (teacher time / student time over the scored split), and writes them to
``{output_dir}/results.json``. ``--split validation`` scores on the validation split:
choose settings with it, and report the test split.

The same job as config files for ``textbrewer distill`` (examples/configs/, docs/cli.md):
``--write-corpus DIR`` writes the corpus as JSON lines, and ``lm_teacher.yaml`` then
``lm_student.yaml`` train the teacher and the distilled student with the same settings
(the tests check that both ways give the same perplexities).

Run:
    python examples/lm_distillation.py                   # a few minutes on one CPU core
    python examples/lm_distillation.py --quick           # seconds (used by the tests)
    python examples/lm_distillation.py --from-cache      # + the offline-teacher path
    python examples/lm_distillation.py --split validation --seeds 0 \\
        --divergences forward_kl reverse_kl jsd          # choose the divergence
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib
import inspect
import io
import os
import pkgutil
import sys
import sysconfig
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' helpers: split_of)

from textbrewer import (CausalLMDistiller, DistillationConfig,  # noqa: E402
                        LMDistillationConfig, TrainingConfig)
from textbrewer.cache import (CachedTeacherCollator, IndexedDataset,  # noqa: E402
                              TeacherCache, write_teacher_cache)
from textbrewer.distillers.lm.config import LM_DIVERGENCES  # noqa: E402
from textbrewer.job.run import perplexity as next_token_perplexity  # noqa: E402
from textbrewer.utils import count_parameters  # noqa: E402

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

VOCAB_SIZE = 256          # byte level
SEPARATOR = 0             # the NUL byte between docstrings
# The two architectures (n_positions is added at run time). The tests rebuild the models
# from these dicts as written to results.json.
TEACHER_CONFIG = dict(n_embd=96, n_layer=3, n_head=4, vocab_size=VOCAB_SIZE,
                      bos_token_id=SEPARATOR, eos_token_id=SEPARATOR,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
STUDENT_CONFIG = dict(n_embd=48, n_layer=2, n_head=2, vocab_size=VOCAB_SIZE,
                      bos_token_id=SEPARATOR, eos_token_id=SEPARATOR,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SKIPPED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
           "ensurepip", "test", "tests", "__main__", "pydoc_data"}


# ---------------------------------------------------------------------------------- data
@contextlib.contextmanager
def _quietly():
    """No warnings or prints while importing (deprecated modules announce themselves)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def stdlib_module_names() -> List[str]:
    """The importable standard-library modules, in sorted order (see the module docstring)."""
    root = sysconfig.get_paths()["stdlib"]
    top = {module.name for module in pkgutil.iter_modules([root])} | set(sys.stdlib_module_names)
    names = []
    for name in sorted(n for n in top if not n.startswith("_") and n not in SKIPPED):
        try:
            with _quietly():
                module = importlib.import_module(name)
        except (Exception, SystemExit):
            continue  # another platform's module (winreg, msvcrt, ...)
        names.append(name)
        if hasattr(module, "__path__"):  # a package: its submodules too
            with _quietly():
                found = sorted(pkgutil.walk_packages(module.__path__, name + ".",
                                                     onerror=lambda _: None),
                               key=lambda info: info.name)
            for info in found:
                if any(part in SKIPPED or part.startswith("_")
                       for part in info.name.split(".")[1:]):
                    continue
                try:
                    with _quietly():
                        importlib.import_module(info.name)
                except (Exception, SystemExit):
                    continue
                names.append(info.name)
    return names


def stdlib_docstrings() -> Dict[str, List[str]]:
    """``{top-level package: [docstring, ...]}``, each docstring once, in a fixed order."""
    seen, documents = set(), collections.defaultdict(list)

    def add(package: str, text: Optional[str]) -> None:
        if text and SEPARATOR not in text.encode("utf-8") and text not in seen:
            seen.add(text)
            documents[package].append(text)

    for name in stdlib_module_names():
        module, package = sys.modules[name], name.split(".")[0]
        add(package, inspect.getdoc(module))
        for attribute, value in inspect.getmembers(module):
            if attribute.startswith("_") or getattr(value, "__module__", None) != name:
                continue  # private, or defined elsewhere (its own module reads it)
            if inspect.isclass(value):
                if "__doc__" in vars(value):  # not a docstring inherited from a base class
                    add(package, inspect.getdoc(value))
                for method_name, method in sorted(vars(value).items()):
                    if method_name.startswith("_") and method_name != "__init__":
                        continue
                    function = getattr(method, "__func__", method)  # static/class methods
                    if inspect.isroutine(function) and isinstance(function.__doc__, str):
                        add(package, inspect.cleandoc(function.__doc__))
            elif inspect.isroutine(value):
                add(package, inspect.getdoc(value))
    return documents


def write_corpus(folder: str) -> Dict[str, int]:
    """Writes ``{train,validation,test}.jsonl`` (one ``{"text": docstring}`` per line, in the
    order :func:`load_data` streams them) for ``textbrewer distill`` (examples/configs/);
    returns the documents per split."""
    import json
    os.makedirs(folder, exist_ok=True)
    lines: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    for package, texts in sorted(stdlib_docstrings().items()):
        lines[data_lib.split_of(package)] += [json.dumps({"text": t}) + "\n" for t in texts]
    for split, rows in lines.items():
        path = os.path.join(folder, f"{split}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:  # renamed when complete
            handle.writelines(rows)
        os.replace(path + ".tmp", path)
    return {split: len(rows) for split, rows in lines.items()}


def load_data(sequence_length: int) -> Dict[str, Any]:
    """Per split, a (blocks, sequence_length) tensor of byte ids, and counts."""
    streams: Dict[str, List[int]] = {"train": [], "validation": [], "test": []}
    packages: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    docstrings = collections.Counter()
    for package, texts in sorted(stdlib_docstrings().items()):
        # the package's split, by a CRC-32 of its name: 80 % train, 10 % validation, 10 % test
        split = data_lib.split_of(package)
        packages[split].append(package)
        docstrings[split] += len(texts)
        for text in texts:
            streams[split] += list(text.encode("utf-8")) + [SEPARATOR]
    blocks = {}
    for split, stream in streams.items():
        usable = len(stream) // sequence_length * sequence_length  # the last partial block goes
        blocks[split] = torch.tensor(stream[:usable], dtype=torch.long).view(-1, sequence_length)
    return {"blocks": blocks, "bytes": {s: len(v) for s, v in streams.items()},
            "docstrings": dict(docstrings), "packages": packages}


def train_loader(blocks: torch.Tensor, batch_size: int, seed: int,
                 indexed: bool = False, collate_fn=None) -> torch.utils.data.DataLoader:
    """Shuffled batches ``{'input_ids': (B, L)}`` from a seeded generator (the same order
    for every run with the same seed). No labels: the distiller's targets are the ids
    themselves, shifted by one."""
    examples = [{"input_ids": row} for row in blocks]
    if indexed:  # examples that carry their index, for the teacher cache's collator
        examples = IndexedDataset(examples)
    return common.shuffled(examples, batch_size, seed, collate_fn, drop_last=True)


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device,
               batch_size: int = 64) -> float:
    """exp(mean next-byte cross-entropy) over every predicted position of ``blocks``
    (:func:`textbrewer.job.run.perplexity`, what ``textbrewer distill`` scores with)."""
    return next_token_perplexity(model, blocks, device, batch_size)["perplexity"]


@torch.no_grad()
def inference_seconds(model: torch.nn.Module, blocks: torch.Tensor, device: torch.device,
                      batch_size: int = 64, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of a forward pass over ``blocks`` (eval mode)."""
    best = float("inf")
    with common.evaluating(model):
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, blocks.size(0), batch_size):
                model(input_ids=blocks[start:start + batch_size].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
    return best


# ---------------------------------------------------------------------------------- training
def gpt2(config: Dict[str, Any], sequence_length: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_positions=sequence_length, **config))


def optimizer_and_schedule(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW; linear warm-up over 5 % of the steps, then linear decay to 10 % of ``lr``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, int(0.05 * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total_steps - warmup))
    return optimizer, dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                           scheduler_args={"lr_lambda": lr_lambda})


def train_config(output_dir: str, device: torch.device, steps: int, seed: int) -> TrainingConfig:
    """One checkpoint (``gs{step}.pkl``), after the last step; no TensorBoard."""
    return TrainingConfig(device=device, output_dir=output_dir, ckpt_steps=steps, seed=seed,
                          log_steps=max(1, steps // 4), log_dir=None)


def train(model, loader, args, device, steps: int, lr: float, seed: int, output_dir: str,
          teacher: Optional[torch.nn.Module] = None, divergence: str = "forward_kl",
          cached: bool = False) -> None:
    """One run of ``CausalLMDistiller``.

    Without a teacher and without ``cached`` (batches that carry the teacher cache's rows),
    ``kd_loss_weight=0``: the cross-entropy alone (the teacher and the student-alone
    baseline). Otherwise ``kd_loss_weight · D + hard_label_weight · CE`` (cached batches
    always use the top-k KL).
    """
    distilling = teacher is not None or cached
    distill_config = DistillationConfig(
        temperature=args.temperature,
        kd_loss_weight=1.0 if distilling else 0.0,
        hard_label_weight=args.hard_label_weight if distilling else 1.0)
    lm_config = LMDistillationConfig(divergence=divergence, beta=args.beta, alpha=args.alpha,
                                     taid_schedule=args.taid_schedule,
                                     topk_tail=args.cache_tail)
    optimizer, schedule = optimizer_and_schedule(model, lr, steps)
    distiller = CausalLMDistiller(train_config(output_dir, device, steps, seed), distill_config,
                                  model_T=teacher, model_S=model, lm_config=lm_config)
    common.fit(distiller, optimizer, loader, num_steps=steps, max_grad_norm=1.0, **schedule)


def write_cache(teacher, data, args, device) -> Tuple[TeacherCache, float]:
    """The teacher's top-k over the training blocks, written once; (cache, seconds)."""
    path = os.path.join(args.output_dir, "teacher_cache")
    clock = time.perf_counter()
    examples = [{"input_ids": row} for row in data["blocks"]["train"]]
    write_teacher_cache(teacher, examples, path, k=args.cache_k, batch_size=64, device=device,
                        overwrite=True)
    return TeacherCache(path, expected_vocab_size=VOCAB_SIZE), time.perf_counter() - clock


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_lm",
                                  quick_help="a much smaller run, for tests (seconds)",
                                  output_help="checkpoints (gs*.pkl), the teacher cache and "
                                              "results.json go here")
    parser.add_quick_argument("--steps", 10, 250, "optimizer steps of each student run, alone "
                              "and distilled: the same budget for both")
    parser.add_quick_argument("--teacher-steps", 20, 500, "optimizer steps of the teacher")
    parser.add_seeds(help="student seeds (initial weights, data order)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split the table scores: choose settings on 'validation'")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl"],
                        choices=[d for d in LM_DIVERGENCES if d != "topk_kl"],
                        help="the KD divergence; with several, one distilled student per "
                             "divergence (the first is 'distilled_student')")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5, help="β of 'jsd'")
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="α of 'skew_kl' and 'skew_reverse_kl' (DistiLLM)")
    parser.add_argument("--taid-schedule", choices=("adaptive", "linear"), default="adaptive",
                        help="how TAID's t moves from 0.4 to 1 (docs/objectives.md)")
    parser.add_argument("--hard-label-weight", type=float, default=1.0,
                        help="weight of the cross-entropy next to the KD term (weight 1)")
    parser.add_argument("--from-cache", action="store_true",
                        help="also train the student from the teacher's top-k cache, "
                             "without the teacher")
    parser.add_argument("--cache-k", type=int, default=16, help="top-k entries kept per byte")
    parser.add_argument("--cache-tail", choices=("renormalize", "uniform"), default="uniform",
                        help="what the cached top-k does with the rest of the probability")
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_training_options(lr=3e-3, batch_size=16, lr_help="students' learning rate")
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_threads("torch CPU threads (default 1: on a busy machine extra threads wait on "
                       "each other; on an idle one, 2 is faster)")
    parser.add_device()
    parser.add_argument("--write-corpus", metavar="DIR",
                        help="only write the corpus as DIR/{train,validation,test}.jsonl for "
                             "the config-file version of this example (examples/configs/), "
                             "then exit")
    parser.require_positive("cache_k", "batch_size")
    args = parser.parse_args(argv)
    if args.sequence_length < 2:
        parser.error("--sequence-length must be at least 2 (a byte and the next one)")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.write_corpus:
        counts = write_corpus(args.write_corpus)
        print(f"wrote {counts} documents to {args.write_corpus}/{{train,validation,test}}.jsonl")
        return {"corpus": counts}
    cpu_started = time.process_time()
    started = common.start(args.threads, quiet=True)  # keep the console to the table
    device = torch.device(args.device)
    data = load_data(args.sequence_length)
    blocks = data["blocks"]
    scored = blocks[args.split]
    if args.quick:  # slices: a quick run scores and writes its cache in seconds
        scored = scored[:64]
        blocks["train"] = blocks["train"][:512]
    print(f"standard-library docstrings, byte level: {data['bytes']['train']:,} / "
          f"{data['bytes']['validation']:,} / {data['bytes']['test']:,} bytes (train / "
          f"validation / test; {len(data['packages']['train'])} / "
          f"{len(data['packages']['validation'])} / {len(data['packages']['test'])} packages), "
          f"{blocks['train'].size(0)} training blocks of {args.sequence_length}; scoring "
          f"{scored.size(0)} {args.split} blocks; device {device}, {args.threads} threads")

    teacher = gpt2(TEACHER_CONFIG, args.sequence_length, 1000).to(device)
    print(f"teacher: {args.teacher_steps} steps ...", flush=True)
    clock = time.perf_counter()
    train(teacher, train_loader(blocks["train"], args.batch_size, 1000), args, device,
          args.teacher_steps, args.teacher_lr, 1000, os.path.join(args.output_dir, "teacher"))
    teacher.eval()
    scores: Dict[str, List[float]] = collections.defaultdict(list)
    scores["teacher"].append(perplexity(teacher, scored, device))
    print(f"  teacher: perplexity {scores['teacher'][0]:.3f} "
          f"({time.perf_counter() - clock:.0f} s)", flush=True)

    cache, cache_seconds = None, None
    if args.from_cache:
        cache, cache_seconds = write_cache(teacher, data, args, device)
        print(f"  teacher cache: k={cache.k}, {cache.num_tokens:,} tokens, "
              f"{cache.bytes_per_token:.2f} bytes/token ({cache_seconds:.0f} s)", flush=True)

    methods = ["student_alone"] + [
        "distilled_student" if i == 0 else f"distilled_{divergence}"
        for i, divergence in enumerate(args.divergences)] + (
        ["distilled_from_cache"] if args.from_cache else [])
    divergence_of = {("distilled_student" if i == 0 else f"distilled_{d}"): d
                     for i, d in enumerate(args.divergences)}
    students: Dict[str, torch.nn.Module] = {}
    for seed in args.seeds:
        student_init = gpt2(STUDENT_CONFIG, args.sequence_length, seed)
        for method in methods:
            clock = time.perf_counter()
            student = copy.deepcopy(student_init).to(device)  # identical starting weights
            run_dir = os.path.join(args.output_dir, method, f"seed{seed}")
            if method == "distilled_from_cache":
                loader = train_loader(blocks["train"], args.batch_size, seed, indexed=True,
                                      collate_fn=CachedTeacherCollator(cache))
                train(student, loader, args, device, args.steps, args.lr, seed, run_dir,
                      cached=True)
            else:
                loader = train_loader(blocks["train"], args.batch_size, seed)
                train(student, loader, args, device, args.steps, args.lr, seed, run_dir,
                      teacher=None if method == "student_alone" else teacher,
                      divergence=divergence_of.get(method, "forward_kl"))
            scores[method].append(perplexity(student, scored, device))
            students[method] = student
            print(f"  seed {seed} {method}: perplexity {scores[method][-1]:.3f} "
                  f"({time.perf_counter() - clock:.0f} s)", flush=True)

    teacher_seconds = inference_seconds(teacher, scored, device)
    student_seconds = inference_seconds(students["student_alone"], scored, device)
    results: Dict[str, Any] = {"models": {}}
    for name in ["teacher"] + methods:
        model = teacher if name == "teacher" else students[name]
        mean, std = common.mean_std(scores[name])
        results["models"][name] = {
            "perplexity": mean, "perplexity_std": std, "per_seed": scores[name],
            "parameters": count_parameters(model),
            "inference_seconds": teacher_seconds if name == "teacher" else student_seconds}
        if name in divergence_of:
            results["models"][name]["divergence"] = divergence_of[name]
    results["speedup"] = teacher_seconds / student_seconds
    results["size_ratio"] = (results["models"]["teacher"]["parameters"]
                             / results["models"]["student_alone"]["parameters"])
    wins = common.better_tied_worse(scores["distilled_student"], scores["student_alone"],
                                    higher_is_better=False)[0]
    results["distilled_better_on_seeds"] = wins
    results["configs"] = {
        "teacher": dict(TEACHER_CONFIG, n_positions=args.sequence_length),
        "student": dict(STUDENT_CONFIG, n_positions=args.sequence_length)}
    results["data"] = {"split": args.split, "tokenizer": "bytes (UTF-8), NUL between docstrings",
                       "vocab_size": VOCAB_SIZE, "sequence_length": args.sequence_length,
                       "bytes": data["bytes"], "docstrings": data["docstrings"],
                       "blocks": {s: b.size(0) for s, b in blocks.items()},
                       "scored_blocks": scored.size(0),
                       "scored_tokens": scored.size(0) * (args.sequence_length - 1),
                       "packages": data["packages"], "python": sys.version.split()[0]}
    if cache is not None:
        results["cache"] = {"k": cache.k, "tail": args.cache_tail,
                            "tokens": cache.num_tokens,
                            "bytes_per_token": cache.bytes_per_token,
                            "write_seconds": round(cache_seconds, 1)}
    results["run"] = common.run_record(args, started, [
        "steps", "teacher_steps", "seeds", "divergences", "temperature", "beta", "alpha",
        "taid_schedule",
        "hard_label_weight", "lr", "teacher_lr", "batch_size", "threads", "quick"],
        settings={"device": str(device)})
    results["run"]["cpu_seconds"] = round(time.process_time() - cpu_started, 1)

    print()
    seeds = (f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1
             else f"seed {args.seeds[0]}")
    print(f"{args.split} split, perplexity per byte, {seeds}:")
    print(f"{'model':<26}{'perplexity':>18}{'parameters':>13}{'speed-up':>10}")
    for name, row in results["models"].items():
        speedup = teacher_seconds / row["inference_seconds"]
        print(f"{name:<26}{common.pm(row['perplexity'], row['perplexity_std'], 10, 3)}"
              f"{row['parameters']:>13,d}{speedup:>9.2f}x")
    change = (results["models"]["distilled_student"]["perplexity"]
              - results["models"]["student_alone"]["perplexity"])
    print(f"the student is {results['size_ratio']:.1f}x smaller and {results['speedup']:.1f}x "
          f"faster than the teacher; distillation changed its perplexity by {change:+.3f} "
          f"(better on {wins} of {len(args.seeds)} seeds); {results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
