"""DistilBERT's recipe: distil a masked-LM BERT into a half-depth DistilBERT, on real English.

The text is the docstrings of Python's own standard library (every module, class and
function docstring of the ``.py`` files under ``sysconfig.get_paths()['stdlib']``, read
with ``ast`` without importing anything; the test suites, ``idlelib``, ``lib2to3``,
``turtledemo``, ``ensurepip`` and ``site-packages`` are left out), in sorted file order, so
it ships with every Python and needs no download. (Its exact content follows the Python
version.) Each file goes, by a CRC-32 of its path, to the training (80 %), validation
(10 %) or test split (10 %).

Tokenizer (built here): **word level**. Lower-cased text is cut into runs of letters, runs
of digits and single punctuation characters; the vocabulary is the ``--vocab-size`` − 5
most frequent tokens of the training split plus ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
Whole docstrings are packed, separated by ``[SEP]``, into sequences of at most 64 tokens
(``[CLS] ... [SEP]``, padded). Masking is BERT's: 15 % of the word tokens (never
specials or ``[UNK]``) are chosen; 80 % of those become ``[MASK]``, 10 % a random word,
10 % stay. Training masks are drawn anew for each batch from a seeded generator;
evaluation masks are drawn once, from a fixed seed, and are the same for every model.

Runs:

1. the teacher: ``BertForMaskedLM`` (width 64, 4 layers, 4 heads), from scratch, on the
   masked-LM loss with ``BasicTrainer``, ``--teacher-epochs`` epochs;
2. per seed, the student alone: ``DistilBertForMaskedLM`` (width 64, 2 layers, 4
   heads), from scratch, masked-LM loss only, ``--epochs`` epochs: the baseline;
3. per seed, the distilled student: the same architecture initialised from the teacher
   (embeddings, masked-LM head and teacher layers 0 and 2:
   ``textbrewer.recipes.init_student_from_teacher``), trained with ``GeneralDistiller`` on
   DistilBERT's loss (``textbrewer.recipes.distilbert_recipe``: 5 · τ²·KL on the masked
   positions at τ = 2 + 2 · its own masked-LM loss + 1 · (1 − cos) between the last hidden
   states), the same ``--epochs``;
4. per seed, optionally (``--ablation``), the student initialised from the teacher but
   trained on its own masked-LM loss only: what the initialisation alone gives.

It prints held-out masked-token accuracy and perplexity (exp of the mean cross-entropy over
the masked positions), parameter counts and the inference speed-up (teacher time /
student time over the evaluation set), as mean ± std over the seeds, and writes them to
``{output_dir}/results.json``. ``--split validation`` scores on the validation split:
choose settings with it, and report the test split.

Run:
    python examples/mlm_distillation.py                  # about 5 CPU-minutes (3 seeds)
    python examples/mlm_distillation.py --quick          # about 25 CPU-seconds (the tests)
    python examples/mlm_distillation.py --split validation --seeds 0 --ablation
"""
from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (the examples' shared helpers)
import _text_data as data_lib  # noqa: E402  (the text examples' data helpers)
from _text_data import CLS, MASK, PAD, SEP, SPECIALS  # noqa: E402

from textbrewer import BasicTrainer, GeneralDistiller, TrainingConfig  # noqa: E402
from textbrewer.recipes import (distilbert_recipe, init_student_from_teacher,  # noqa: E402
                                mlm_adaptor)
from textbrewer.utils import count_parameters  # noqa: E402

try:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install -e '.[transformers]'")

SEQUENCE_LENGTH = 64
FIRST_WORD = len(SPECIALS)  # the ids below are [PAD] [UNK] [CLS] [SEP] [MASK]
IGNORE = -100
EVAL_MASK_SEED = 1234
# The two architectures (vocab_size is added at run time). The tests rebuild the models
# from these dicts as written to results.json.
TEACHER_CONFIG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=256, max_position_embeddings=SEQUENCE_LENGTH,
                      type_vocab_size=1, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)
STUDENT_CONFIG = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=256,
                      max_position_embeddings=SEQUENCE_LENGTH, dropout=0.1,
                      attention_dropout=0.1)


# ---------------------------------------------------------------------------------- data
def pack(documents: List[List[int]], length: int = SEQUENCE_LENGTH) -> Dict[str, torch.Tensor]:
    """Packs token-id lists into ``{'input_ids', 'attention_mask'}``, each (N, length).

    Whole documents are joined with [SEP] while they fit; longer ones are cut in pieces.
    """
    room = length - 2  # [CLS] ... [SEP]
    sequences: List[List[int]] = []
    current: List[int] = []
    for document in documents:
        pieces = [document[i:i + room] for i in range(0, len(document), room)]
        for piece in pieces:
            needed = len(piece) + (1 if current else 0)
            if current and len(current) + needed > room:
                sequences.append(current)
                current = []
            current = current + [SEP] + piece if current else list(piece)
    if current:
        sequences.append(current)
    input_ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens = [CLS] + sequence + [SEP]
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long()}


def load_data(vocab_size: int, max_files: Optional[int] = None) -> Dict[str, Any]:
    """Splits of packed sequences, the vocabulary and counts. Each stdlib file goes to one
    split (:func:`_text_data.split_of` of its path); docstrings are cut into words
    (:func:`_text_data.words`)."""
    documents: Dict[str, List[List[str]]] = {"train": [], "validation": [], "test": []}
    paths = data_lib.spread(data_lib.stdlib_files(), max_files)
    for record in data_lib.stdlib_docstrings(paths):
        tokens = data_lib.words(record["docstring"])
        if tokens:
            documents[data_lib.split_of(record["path"])].append(tokens)
    # the most frequent training words first, ties alphabetically: the same on every run
    vocabulary = data_lib.Vocabulary(documents["train"], vocab_size)
    splits = {name: pack([vocabulary.encode(document) for document in docs])
              for name, docs in documents.items()}
    tokens = {name: sum(len(d) for d in docs) for name, docs in documents.items()}
    unknown = sum(1 for d in documents["test"] for t in d if t not in vocabulary.index)
    return {"splits": splits, "vocabulary": vocabulary, "documents":
            {name: len(docs) for name, docs in documents.items()}, "tokens": tokens,
            "test_unknown_rate": unknown / max(tokens["test"], 1)}


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a (B, L) batch: ``(masked input_ids, labels)``, both (B, L).

    ``rate`` of the word tokens are chosen (labels: their ids; -100 elsewhere); of those,
    80 % become [MASK], 10 % a random word, 10 % stay as they are.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < rate) & (input_ids >= FIRST_WORD)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_words = torch.randint(FIRST_WORD, vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = MASK
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_words[swap]
    return masked, labels


class MaskingCollator:
    """Stacks examples and masks them with its own seeded generator (fresh masks each batch)."""

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        input_ids = torch.stack([example["input_ids"] for example in examples])
        attention_mask = torch.stack([example["attention_mask"] for example in examples])
        masked, labels = mask_tokens(input_ids, self.vocab_size, self.generator)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


def train_loader(split: Dict[str, torch.Tensor], vocab_size: int, batch_size: int,
                 seed: int) -> torch.utils.data.DataLoader:
    examples = [{"input_ids": ids, "attention_mask": mask}
                for ids, mask in zip(split["input_ids"], split["attention_mask"])]
    return common.shuffled(examples, batch_size, seed, MaskingCollator(vocab_size, seed))


def evaluation_batch(split: Dict[str, torch.Tensor], vocab_size: int) -> Dict[str, torch.Tensor]:
    """The split with fixed masks (seed ``EVAL_MASK_SEED``), the same for every model."""
    masked, labels = mask_tokens(split["input_ids"], vocab_size,
                                 torch.Generator().manual_seed(EVAL_MASK_SEED))
    return {"input_ids": masked, "attention_mask": split["attention_mask"], "labels": labels}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: Dict[str, torch.Tensor], device: torch.device,
             batch_size: int = 128) -> Dict[str, float]:
    """Masked-token accuracy and perplexity (exp of the mean cross-entropy) over the masked
    positions. Plain slicing, eval mode (restored after)."""
    correct, loss_sum, count = 0, 0.0, 0
    with common.evaluating(model):
        for start in range(0, batch["input_ids"].size(0), batch_size):
            labels = batch["labels"][start:start + batch_size].to(device)
            logits = model(input_ids=batch["input_ids"][start:start + batch_size].to(device),
                           attention_mask=batch["attention_mask"][start:start + batch_size]
                           .to(device)).logits
            kept = labels != IGNORE
            logits, labels = logits[kept].float(), labels[kept]
            correct += (logits.argmax(-1) == labels).sum().item()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels,
                                                          reduction="sum").item()
            count += labels.numel()
    return {"masked_accuracy": correct / max(count, 1),
            "perplexity": math.exp(loss_sum / max(count, 1)), "masked_tokens": count}


@torch.no_grad()
def inference_seconds(model: torch.nn.Module, batch: Dict[str, torch.Tensor],
                      device: torch.device, batch_size: int = 128, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of a forward pass over ``batch`` (eval mode)."""
    best = float("inf")
    with common.evaluating(model):
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, batch["input_ids"].size(0), batch_size):
                model(input_ids=batch["input_ids"][start:start + batch_size].to(device),
                      attention_mask=batch["attention_mask"][start:start + batch_size]
                      .to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
    return best


# ---------------------------------------------------------------------------------- training
def optimizer_and_schedule(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW; linear warm-up over 6 % of the steps, then linear decay to zero."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, int(0.06 * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return optimizer, dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                           scheduler_args={"lr_lambda": lr_lambda})


def train_config(args: argparse.Namespace, output_dir: str, device: torch.device,
                 epochs: int, seed: int) -> TrainingConfig:
    """One checkpoint (``gs{step}.pkl``), after the last epoch."""
    return TrainingConfig(device=device, output_dir=output_dir, ckpt_epoch_frequency=epochs,
                          seed=seed, log_steps=50, log_dir=None)


def train_alone(model, data, args, device, epochs: int, lr: float, seed: int,
                output_dir: str) -> None:
    """Masked-LM training on the model's own loss (teacher, student baselines)."""
    loader = train_loader(data["splits"]["train"], len(data["vocabulary"]), args.batch_size,
                          seed)
    optimizer, schedule = optimizer_and_schedule(model, lr, epochs * len(loader))
    trainer = BasicTrainer(train_config(args, output_dir, device, epochs, seed), model,
                           mlm_adaptor(hidden=False))
    common.fit(trainer, optimizer, loader, num_epochs=epochs, **schedule)


def distil(teacher, student, data, args, device, seed: int, output_dir: str) -> None:
    """DistilBERT's loss with ``GeneralDistiller``; hidden states for the cosine term."""
    distill_config = distilbert_recipe(temperature=args.temperature, alpha_ce=args.alpha_ce,
                                       alpha_mlm=args.alpha_mlm, alpha_cos=args.alpha_cos)
    loader = train_loader(data["splits"]["train"], len(data["vocabulary"]), args.batch_size,
                          seed)
    optimizer, schedule = optimizer_and_schedule(student, args.lr, args.epochs * len(loader))
    distiller = GeneralDistiller(train_config(args, output_dir, device, args.epochs, seed),
                                 distill_config, model_T=teacher, model_S=student,
                                 adaptor_T=mlm_adaptor(), adaptor_S=mlm_adaptor())
    common.fit(distiller, optimizer, loader, num_epochs=args.epochs, **schedule,
               output_hidden_states=True)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.ExampleParser(__doc__, "./output_mlm",
                                  quick_help="a much smaller run, for tests (seconds)")
    parser.add_quick_argument("--epochs", 1, 1, "epochs of each student run, alone and "
                              "distilled: the same budget for both")
    parser.add_quick_argument("--teacher-epochs", 1, 3, "epochs of the teacher")
    parser.add_seeds(help="student seeds (data order, masks, dropout, the baseline's initial "
                          "weights)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split the table scores: choose settings on 'validation'")
    parser.add_argument("--ablation", action="store_true",
                        help="also train the teacher-initialised student on its masked-LM "
                             "loss alone (no distillation loss)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_quick_argument("--max-files", 60, None,
                              "read only this many standard-library files")
    parser.add_training_options(lr=1e-3, lr_help="students' learning rate")
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha-ce", type=float, default=5.0)
    parser.add_argument("--alpha-mlm", type=float, default=2.0)
    parser.add_argument("--alpha-cos", type=float, default=1.0)
    parser.add_threads("torch CPU threads (default 1: on a busy machine extra threads wait on "
                       "each other)")
    parser.add_device()
    args = parser.parse_args(argv)
    if args.vocab_size <= FIRST_WORD:
        parser.error(f"--vocab-size must be more than {FIRST_WORD} (the special tokens)")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    started = common.start(args.threads, quiet=True)  # keep the console to the table
    device = torch.device(args.device)
    data = load_data(args.vocab_size, args.max_files)
    vocab_size = len(data["vocabulary"])
    teacher_config = dict(TEACHER_CONFIG, vocab_size=vocab_size)
    student_config = dict(STUDENT_CONFIG, vocab_size=vocab_size)
    evaluation = evaluation_batch(data["splits"][args.split], vocab_size)
    sizes = {name: split["input_ids"].size(0) for name, split in data["splits"].items()}
    print(f"standard-library docstrings: {data['documents']['train']} / "
          f"{data['documents']['validation']} / {data['documents']['test']} docstrings, "
          f"{sizes['train']} / {sizes['validation']} / {sizes['test']} sequences of "
          f"{SEQUENCE_LENGTH} (train / validation / test), vocabulary {vocab_size} words; "
          f"scoring the {args.split} split ({int((evaluation['labels'] != IGNORE).sum())} "
          f"masked tokens); device {device}, {args.threads} threads")

    torch.manual_seed(1000)  # the teacher: one fixed seed, apart from the students'
    teacher = BertForMaskedLM(BertConfig(**teacher_config)).to(device)
    print(f"teacher: {args.teacher_epochs} epochs ...", flush=True)
    clock = time.perf_counter()
    train_alone(teacher, data, args, device, args.teacher_epochs, args.teacher_lr, 1000,
                os.path.join(args.output_dir, "teacher"))
    teacher.eval()
    scores: Dict[str, List[Dict[str, float]]] = collections.defaultdict(list)
    scores["teacher"].append(evaluate(teacher, evaluation, device))
    print(f"  teacher: masked accuracy {scores['teacher'][0]['masked_accuracy']:.4f}, "
          f"perplexity {scores['teacher'][0]['perplexity']:.1f} "
          f"({time.perf_counter() - clock:.0f} s)")

    methods = ["student_alone", "distilled_student"] + (["initialised_alone"]
                                                        if args.ablation else [])
    students: Dict[str, torch.nn.Module] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        student_init = DistilBertForMaskedLM(DistilBertConfig(**student_config))
        for method in methods:
            clock = time.perf_counter()
            student = copy.deepcopy(student_init).to(device)
            run_dir = os.path.join(args.output_dir, method, f"seed{seed}")
            if method != "student_alone":  # DistilBERT's initialisation: layers 0, 2 of 4
                init_student_from_teacher(teacher, student)
            if method == "distilled_student":
                distil(teacher, student, data, args, device, seed, run_dir)
            else:
                train_alone(student, data, args, device, args.epochs, args.lr, seed, run_dir)
            scores[method].append(evaluate(student, evaluation, device))
            students[method] = student
            print(f"  seed {seed} {method}: masked accuracy "
                  f"{scores[method][-1]['masked_accuracy']:.4f}, perplexity "
                  f"{scores[method][-1]['perplexity']:.1f} "
                  f"({time.perf_counter() - clock:.0f} s)", flush=True)

    teacher_seconds = inference_seconds(teacher, evaluation, device)
    student_seconds = inference_seconds(students["student_alone"], evaluation, device)
    results: Dict[str, Any] = {"models": {}}
    for name in ["teacher"] + methods:
        model = teacher if name == "teacher" else students[name]
        accuracies = [s["masked_accuracy"] for s in scores[name]]
        perplexities = [s["perplexity"] for s in scores[name]]
        accuracy, accuracy_std = common.mean_std(accuracies)
        perplexity, perplexity_std = common.mean_std(perplexities)
        results["models"][name] = {
            "masked_accuracy": accuracy, "masked_accuracy_std": accuracy_std,
            "perplexity": perplexity, "perplexity_std": perplexity_std,
            "per_seed": {"masked_accuracy": accuracies, "perplexity": perplexities},
            "parameters": count_parameters(model),
            "inference_seconds": teacher_seconds if name == "teacher" else student_seconds}
    results["speedup"] = teacher_seconds / student_seconds
    results["size_ratio"] = (results["models"]["teacher"]["parameters"]
                             / results["models"]["student_alone"]["parameters"])
    results["configs"] = {"teacher": teacher_config, "student": student_config}
    results["data"] = {"split": args.split, "sequence_length": SEQUENCE_LENGTH,
                       "vocab_size": vocab_size, "sequences": sizes,
                       "docstrings": data["documents"], "tokens": data["tokens"],
                       "test_unknown_rate": data["test_unknown_rate"],
                       "masked_tokens": scores["teacher"][0]["masked_tokens"]}
    results["run"] = common.run_record(args, started, [
        "epochs", "teacher_epochs", "seeds", "lr", "teacher_lr", "temperature", "alpha_ce",
        "alpha_mlm", "alpha_cos", "batch_size", "threads", "quick"],
        settings={"device": str(device)})

    print()
    seeds = (f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1
             else f"seed {args.seeds[0]}")
    print(f"{args.split} split, {seeds}:")
    print(f"{'model':<20}{'masked accuracy':>20}{'perplexity':>18}{'parameters':>13}"
          f"{'speed-up':>10}")
    for name, row in results["models"].items():
        speedup = teacher_seconds / row["inference_seconds"]
        print(f"{name:<20}{common.pm(row['masked_accuracy'], row['masked_accuracy_std'], 12)}"
              f"{row['perplexity']:>10.1f} ± {row['perplexity_std']:5.1f}"
              f"{row['parameters']:>13,d}{speedup:>9.2f}x")
    gain = (results["models"]["distilled_student"]["masked_accuracy"]
            - results["models"]["student_alone"]["masked_accuracy"])
    print(f"the student is {results['size_ratio']:.2f}x smaller and {results['speedup']:.2f}x "
          f"faster than the teacher; distillation changed its masked accuracy by "
          f"{100 * gain:+.1f} points; {results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


if __name__ == "__main__":
    main()
