"""Shared parts of the text examples: offline data from Python's standard library, readers
for the usual formats (SST-2 TSV, CoNLL-2003, SQuAD JSON), a word-level vocabulary, the
BERT sizes, the teacher / student-alone / TinyBERT-distilled runs, and the timing / table
helpers. (What all the examples share, text or not, is in ``_common.py`` beside it.)

Nothing here downloads anything. The offline data sets are built from the ``.py`` files of
the running Python's standard library (``sysconfig.get_paths()['stdlib']``), read with
``ast`` and ``tokenize`` without importing them; the test suites, ``idlelib``, ``lib2to3``,
``turtledemo``, ``ensurepip`` and ``site-packages`` are left out. Their exact content
follows the Python version (the numbers in examples/README.md are from Python 3.11).
"""
from __future__ import annotations

import argparse
import ast
import collections
import copy
import io
import json
import keyword
import os
import re
import statistics
import sysconfig
import time
import tokenize
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

import _common as common  # examples/_common.py, on the path beside this file
from textbrewer import BasicTrainer, DistillationConfig, GeneralDistiller, TrainingConfig
from textbrewer.recipes import tinybert_layer_mapping
from textbrewer.utils import count_parameters, seed_everything

SKIPPED_DIRECTORIES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
                       "site-packages", "__pycache__"}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIALS))
# Prose: runs of letters, runs of digits, single other characters; lower-cased.
WORD_PATTERN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


# ------------------------------------------------------------------------- the stdlib
def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(top_level: Optional[Sequence[str]] = None,
                 single_modules: bool = False) -> List[str]:
    """Sorted paths (relative to the stdlib root) of its ``.py`` files.

    Args:
        top_level: keep only files under these top-level packages / modules (e.g.
            ``['email', 'asyncio']``); None keeps all.
        single_modules: keep only top-level single-file modules (``os.py``, ``json`` is
            a package so it is not one).
    """
    root = stdlib_root()
    paths = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES
                                   and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), root)
            parts = relative.split(os.sep)
            if single_modules and len(parts) > 1:
                continue
            if top_level is not None and parts[0].removesuffix(".py") not in top_level:
                continue
            paths.append(relative)
    return sorted(paths)


def spread(paths: List[str], max_files: Optional[int]) -> List[str]:
    """At most ``max_files`` of ``paths``, spread evenly over them (all when None)."""
    if max_files is None:
        return paths
    return paths[::max(1, len(paths) // max_files)][:max_files]


def read_source(relative: str) -> Optional[str]:
    try:
        with open(os.path.join(stdlib_root(), relative), encoding="utf-8") as handle:
            return handle.read()
    except (UnicodeDecodeError, OSError):
        return None


def split_of(key: str) -> str:
    """A split from a CRC-32 of ``key``: 80 % train, 10 % validation, 10 % test."""
    bucket = zlib.crc32(key.encode("utf-8")) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def train_and_test(records: Iterable[Dict[str, Any]],
                   validation: bool = False) -> Dict[str, List[Dict[str, Any]]]:
    """``{'train': [...], 'test': [...]}``: the records whose ``'split'`` is each (the
    validation records are left out, unless ``validation``: then ``'validation'`` too), in
    their order."""
    records = list(records)
    names = ("train", "validation", "test") if validation else ("train", "test")
    return {name: [r for r in records if r["split"] == name] for name in names}


def train_and_scored(records: Iterable[Dict[str, Any]],
                     split: str = "test") -> Dict[str, List[Dict[str, Any]]]:
    """``{'train': [...], 'test': [...]}`` where ``'test'`` holds the records of ``split``
    (``'test'``, or ``'validation'`` to choose settings: :func:`add_split_option`)."""
    splits = train_and_test(records, validation=True)
    return {"train": splits["train"], "test": splits[split]}


def add_split_option(parser: "common.ExampleParser") -> None:
    """``--split {test,validation}``: what the table scores (:func:`train_and_scored`)."""
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="what the table scores: the test split (default) or, to choose "
                             "settings, the validation split")


def words(text: str) -> List[str]:
    return WORD_PATTERN.findall(text.lower())


def identifier_words(name: str) -> List[str]:
    """``'get_config_var'`` -> ``['get', '_', 'config', '_', 'var']`` (so names are spans)."""
    return [piece for piece in re.split(r"(_)", name.lower()) if piece]


# ---------------------------------------------------------------------- vocabulary
class Vocabulary:
    """Word -> id: the specials, then the most frequent training words (ties alphabetical).

    ``extra`` tokens (e.g. ``'[UNK-NAME]'``) follow the specials, so unknown words can keep
    their kind.
    """

    def __init__(self, token_lists: Iterable[Sequence[str]], size: int,
                 extra: Sequence[str] = ()):
        counts = collections.Counter(t for tokens in token_lists for t in tokens)
        head = SPECIALS + list(extra)
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        self.tokens = head + [t for t in ranked if t not in head][:max(0, size - len(head))]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str], unknown: Optional[Sequence[str]] = None) -> List[int]:
        """Ids of ``tokens``; an unknown token becomes ``unknown[i]`` if given, else [UNK]."""
        return [self.index.get(t, self.index.get(unknown[i], UNK) if unknown else UNK)
                for i, t in enumerate(tokens)]


def pad(rows: Sequence[Sequence[int]], length: int, value: int = PAD) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        row = list(row)[:length]
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# ------------------------------------------------------------- 1. classification data
# Docstrings labelled by the family of the package they come from.
FAMILIES = {
    "asyncio": ["asyncio"],
    "email": ["email", "mailbox", "smtplib", "imaplib", "poplib"],
    "importlib": ["importlib", "pkgutil", "zipimport", "runpy", "modulefinder"],
    "multiprocessing": ["multiprocessing", "concurrent", "threading", "queue"],
    "tkinter": ["tkinter"],
    "unittest": ["unittest", "doctest"],
    "web": ["http", "urllib", "wsgiref", "xmlrpc"],
    "xml": ["xml", "html"],
}


def stdlib_docstrings(paths: Sequence[str]) -> Iterator[Dict[str, Any]]:
    """Every module, class and function docstring of ``paths``, in file order."""
    for relative in paths:
        source = read_source(relative)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    yield {"path": relative, "node": node, "docstring": docstring,
                           "line": getattr(node, "lineno", 0)}


def stdlib_classification(max_per_class: int, length: int) -> Dict[str, Any]:
    """Docstrings labelled by package family (:data:`FAMILIES`), split per docstring.

    Each docstring goes to train / validation / test by a CRC-32 of ``path:line``; at most
    ``max_per_class`` per family are kept (by that same hash order, so the pick is fixed).
    """
    labels = sorted(FAMILIES)
    family_of = {package: family for family, packages in FAMILIES.items()
                 for package in packages}
    per_family: Dict[str, List[Tuple[int, str, List[str]]]] = collections.defaultdict(list)
    paths = stdlib_files(top_level=sorted(family_of))
    for record in stdlib_docstrings(paths):
        top = record["path"].split(os.sep)[0].removesuffix(".py")
        key = f"{record['path']}:{record['line']}"
        tokens = words(record["docstring"])[:length]
        if len(tokens) >= 3:
            per_family[family_of[top]].append((zlib.crc32(key.encode()), key, tokens))
    examples = []
    for family in labels:
        for _, key, tokens in sorted(per_family[family])[:max_per_class]:
            examples.append({"tokens": tokens, "label": labels.index(family),
                             "split": split_of(key)})
    return {"examples": examples, "labels": labels}


def read_tsv_classification(path: str) -> Dict[str, Any]:
    """A GLUE-style TSV (SST-2's ``train.tsv``/``dev.tsv``): a header with ``sentence`` and
    ``label`` columns, one example per line. Labels are kept as their strings, sorted."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if "sentence" not in header or "label" not in header:
            raise ValueError(f"{path}: expected a header with 'sentence' and 'label' columns "
                             f"(GLUE SST-2 format), got {header}")
        text_column, label_column = header.index("sentence"), header.index("label")
        for number, line in enumerate(handle, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) <= max(text_column, label_column):
                raise ValueError(f"{path}:{number}: {len(fields)} columns, header has "
                                 f"{len(header)}")
            rows.append((fields[text_column], fields[label_column]))
    return {"rows": rows}


# ------------------------------------------------------------------- 2. tagging data
NER_TAGS = ["O", "B-DEF", "B-CLASS", "B-CALL", "B-ATTR"]
UNKNOWN_KINDS = ["[UNK-NAME]", "[UNK-NUM]", "[UNK-STR]", "[UNK-OP]"]
_SKIPPED_TOKENS = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
                   tokenize.ENCODING, tokenize.ENDMARKER, tokenize.TYPE_COMMENT}


def _tag_line(tokens: List[tokenize.TokenInfo]) -> Tuple[List[str], List[str], List[str]]:
    """(texts, kinds, tags) of one logical line; tags by the rules of :func:`stdlib_tagging`."""
    texts, kinds, tags = [], [], []
    for i, token in enumerate(tokens):
        before = tokens[i - 1].string if i > 0 else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        tag = "O"
        if token.type == tokenize.NAME and not keyword.iskeyword(token.string):
            if before == "def":
                tag = "B-DEF"
            elif before == "class":
                tag = "B-CLASS"
            elif after == "(":
                tag = "B-CALL"
            elif before == ".":
                tag = "B-ATTR"
        kind = {tokenize.NAME: "[UNK-NAME]", tokenize.NUMBER: "[UNK-NUM]",
                tokenize.STRING: "[UNK-STR]"}.get(token.type, "[UNK-OP]")
        # a string literal is one token: its text is replaced by its kind (no prose inside)
        texts.append(kind if token.type == tokenize.STRING else token.string)
        kinds.append(kind)
        tags.append(tag)
    return texts, kinds, tags


def stdlib_tagging(max_files: Optional[int], length: int) -> Dict[str, Any]:
    """Logical lines of stdlib source, each token tagged by its role.

    Python's own ``tokenize`` cuts the lines; a NAME (not a keyword) is tagged
    ``B-DEF`` after ``def``, ``B-CLASS`` after ``class``, else ``B-CALL`` before ``(``,
    else ``B-ATTR`` after ``.``; everything else is ``O``. Lines with fewer than 4 tokens
    are left out, longer ones cut at ``length``. Each *file* goes to one split (CRC-32 of
    its path), so test lines come from files never seen in training.
    """
    paths = spread(stdlib_files(single_modules=True), max_files)
    sentences = []
    for relative in paths:
        source = read_source(relative)
        if source is None:
            continue
        split = split_of(relative)
        line: List[tokenize.TokenInfo] = []
        try:
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                if token.type in _SKIPPED_TOKENS:
                    continue
                if token.type == tokenize.NEWLINE:
                    if len(line) >= 4:
                        texts, kinds, tags = _tag_line(line[:length])
                        sentences.append({"tokens": texts, "kinds": kinds, "tags": tags,
                                          "split": split})
                    line = []
                else:
                    line.append(token)
        except (tokenize.TokenError, SyntaxError, IndentationError):
            continue
    return {"sentences": sentences, "tags": list(NER_TAGS)}


def read_conll(path: str) -> List[Dict[str, List[str]]]:
    """CoNLL-2003 style: one token per line, the word first and the tag last, blank lines
    between sentences, ``-DOCSTART-`` lines skipped."""
    sentences, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}:{number}: expected 'word ... tag', got {line!r}")
            tokens.append(fields[0])
            tags.append(fields[-1])
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def chunks(tags: Sequence[str]) -> set:
    """Entity chunks ``(type, start, end)`` of an IOB1 / IOB2 tag sequence, as conlleval
    reads them (a tag without a prefix is a one-token chunk of that type)."""
    found, start, kind = set(), 0, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag == "O":
            prefix, label = "O", None
        elif "-" in tag:
            prefix, label = tag.split("-", 1)
        else:
            prefix, label = "B", tag
        if kind is not None and (prefix in ("O", "B") or label != kind):
            found.add((kind, start, i - 1))
            kind = None
        if prefix != "O" and kind is None:
            start, kind = i, label
    return found


# ---------------------------------------------------------------------- 3. span data
def _summary(docstring: str) -> List[str]:
    first = docstring.strip().split("\n\n")[0]
    return words(re.split(r"\.\s", first)[0])


def stdlib_spans(candidates: int, max_files: Optional[int], question_length: int,
                 seed: int = 0, train_shuffles: int = 1) -> Dict[str, Any]:
    """"Which function does this docstring describe?", as extractive QA.

    For every stdlib single-file module, its documented functions and methods are taken in
    order in groups of ``candidates``. For each function of a group one example is made:
    the *question* is its docstring's summary (the first sentence of the first paragraph,
    at most ``question_length`` words); the *context* lists the group's functions, in an
    order shuffled per example, each as ``def <name> ( <arguments> ) : <summary> ;``; the
    *answer* is the function's name, split at underscores (``get _ config _ var``), so the
    answer is a span of one or more tokens. Each file goes to one split.

    ``train_shuffles`` > 1 augments the training split: each of its examples comes
    ``train_shuffles`` times, the group in a different random order each time (the extra
    orders follow the first, so the first ones, and the validation and test examples, are
    those of ``train_shuffles=1``).
    """
    import random
    rng = random.Random(seed)
    # its own generator: the extra orders leave ``rng``'s sequence (the other examples) as is
    extra_rng = random.Random(f"{seed}-extra-shuffles")
    paths = spread(stdlib_files(single_modules=True), max_files)
    examples = []
    for relative in paths:
        functions = []
        for record in stdlib_docstrings([relative]):
            node = record["node"]
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            summary = _summary(record["docstring"])[:question_length]
            if len(summary) < 3 or node.name.startswith("__"):
                continue
            arguments = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
            functions.append({"name": identifier_words(node.name), "summary": summary,
                              "arguments": [w for a in arguments for w in
                                            identifier_words(a) + [","]][:-1]})
        split = split_of(relative)
        for group_start in range(0, len(functions) - candidates + 1, candidates):
            group = functions[group_start:group_start + candidates]
            if len({" ".join(f["name"]) for f in group}) < len(group):
                continue  # two functions of the same name: the answer would be ambiguous
            for target in range(len(group)):
                for copy_number in range(train_shuffles if split == "train" else 1):
                    order = list(range(len(group)))
                    (rng if copy_number == 0 else extra_rng).shuffle(order)
                    context: List[str] = []
                    for position in order:
                        function = group[position]
                        if position == target:
                            start = len(context) + 1
                            end = start + len(function["name"]) - 1
                        context += (["def"] + function["name"] + ["("] + function["arguments"]
                                    + [")", ":"] + function["summary"] + [";"])
                    examples.append({"question": group[target]["summary"], "context": context,
                                     "start": start, "end": end, "split": split})
    return {"examples": examples}


def read_squad(path: str) -> List[Dict[str, Any]]:
    """SQuAD v1.1 JSON -> examples with word-level ``question``/``context`` and the first
    answer as a word span (``start``, ``end`` inclusive). Unanswerable (v2) questions and
    answers whose text does not fall on word boundaries of our tokenizer are skipped."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "data" not in data:
        raise ValueError(f"{path}: not SQuAD JSON (no top-level 'data' list)")
    examples = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            text = paragraph["context"]
            spans = [(m.group().lower(), m.start(), m.end())
                     for m in re.finditer(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", text)]
            starts = {begin: i for i, (_, begin, _) in enumerate(spans)}
            ends = {finish: i for i, (_, _, finish) in enumerate(spans)}
            for qa in paragraph["qas"]:
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue
                answer = qa["answers"][0]
                begin = answer["answer_start"]
                finish = begin + len(answer["text"].rstrip())
                if begin not in starts or finish not in ends:
                    continue
                examples.append({"question": words(qa["question"]),
                                 "context": [t for t, _, _ in spans],
                                 "start": starts[begin], "end": ends[finish]})
    return examples


# ---------------------------------------------------------------- timing and tables
@torch.no_grad()
def seconds_per_batch(models: Dict[str, torch.nn.Module],
                      batches: Sequence[Dict[str, torch.Tensor]],
                      repeats: int = 5) -> Dict[str, float]:
    """Each model's inference cost per batch over the same ``batches`` (eval mode), in CPU
    seconds of this process (``time.process_time``), not wall-clock seconds.

    CPU time is what the model costs, whatever else runs on the machine: wall-clock times
    on a busy machine varied 4x between two runs of the same architecture. (With several
    threads it adds up their work, spin-waiting included; the numbers in
    examples/README.md are from OMP_NUM_THREADS=1.) On a GPU, use wall-clock time with
    ``torch.cuda.synchronize()`` instead. The models take turns, ``repeats`` rounds, and
    each keeps its fastest pass.
    """
    best = {name: float("inf") for name in models}
    with common.evaluating(*models.values()):
        for model in models.values():
            for _ in range(3):  # warm-up: the first calls of a model are slower
                model(**batches[0])
        for _ in range(repeats):
            for name, model in models.items():
                started = time.process_time()
                for batch in batches:
                    model(**batch)
                best[name] = min(best[name], (time.process_time() - started) / len(batches))
    return best


def print_table(models: Dict[str, Dict[str, Any]], metrics: Sequence[str]) -> None:
    """One row per model: its metrics, parameters and speed-up over the teacher."""
    widths = [max(10, len(m)) + 2 for m in metrics]
    header = f"{'model':<24}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, widths))
    print(header + f"{'parameters':>13}{'speed-up':>10}")
    for name, row in models.items():
        cells = "".join(f"{row[m]:>{w}.4f}" for m, w in zip(metrics, widths))
        print(f"{name:<24}{cells}{row['parameters']:>13,d}{row['speedup']:>9.1f}x")


def score(models: Dict[str, torch.nn.Module], test_batches: Sequence[Dict[str, torch.Tensor]],
          metrics: Callable[[torch.nn.Module], Dict[str, float]], device,
          label_keys: Sequence[str] = ("labels",)) -> Dict[str, Dict[str, Any]]:
    """The rows of the results table: per model its ``metrics(model)`` (scores on the test
    batches), parameters, CPU seconds per batch (:func:`seconds_per_batch` over the first 8
    test batches, without ``label_keys``) and its speed-up over ``models['teacher']``."""
    timing_batches = [to_device({k: v for k, v in b.items() if k not in label_keys}, device)
                      for b in test_batches[:8]]
    seconds = seconds_per_batch(models, timing_batches)
    return {name: {**metrics(model), "parameters": count_parameters(model),
                   "seconds_per_batch": seconds[name],
                   "speedup": seconds["teacher"] / seconds[name]}
            for name, model in models.items()}


def report(results: Dict[str, Any], metrics: Sequence[str], output_dir: str) -> None:
    """Prints the table of ``results['models']`` and the run's seconds, writes results.json."""
    print()
    print_table(results["models"], metrics)
    print(f"{results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(output_dir, results)}")


def over_seeds(args, run_seed: Callable[[argparse.Namespace], Dict[str, Any]],
               metrics: Sequence[str]) -> Dict[str, Any]:
    """``run_seed(args)`` once per seed of ``--seeds``; returns the results.

    One seed: that run's results, as :func:`report` wrote them. Several: each seed's run
    goes to ``{output_dir}/seed{S}`` (its own table and results.json), then, per model, the
    mean and sample standard deviation of each of ``metrics`` over the seeds and their
    per-seed values (``{metric}``, ``{metric}_std``, ``{metric}_per_seed``), its parameters
    and mean speed-up; each ``distilled*_L{n}`` row also counts the seeds on which it beat,
    tied and lost to ``student_alone_L{n}`` on ``metrics[0]`` (``vs_student_alone_L{n}``).
    Printed as a table and written to ``{output_dir}/results.json``.
    """
    if len(args.seeds) == 1:
        return run_seed(args)
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        print(f"\n=== seed {seed} ===", flush=True)
        runs.append(run_seed(argparse.Namespace(**{
            **vars(args), "seed": seed, "seeds": [seed],
            "output_dir": os.path.join(args.output_dir, f"seed{seed}")})))
    models: Dict[str, Dict[str, Any]] = {}
    for name in runs[0]["models"]:
        rows = [run["models"][name] for run in runs]
        models[name] = {"parameters": rows[0]["parameters"],
                        "speedup": statistics.fmean(row["speedup"] for row in rows)}
        for metric in metrics:
            values = [row[metric] for row in rows]
            mean, std = common.mean_std(values)
            models[name].update({metric: mean, f"{metric}_std": std,
                                 f"{metric}_per_seed": values})
    first = metrics[0]
    for name, row in models.items():
        depth = re.fullmatch(r"distilled\w*_L(\d+)", name)
        baseline = depth and f"student_alone_L{depth.group(1)}"
        if baseline in models:
            row[f"vs_{baseline}"] = dict(zip(("better", "tied", "worse"), common.better_tied_worse(
                row[f"{first}_per_seed"], models[baseline][f"{first}_per_seed"])))
    results = {"models": models, "data": runs[0]["data"], "configs": runs[0]["configs"],
               "run": {**{k: v for k, v in runs[0]["run"].items() if k != "seed"},
                       "seeds": list(args.seeds),
                       "seconds": round(time.perf_counter() - started, 1)}}
    print(f"\nmean ± std over seeds {args.seeds}; 'beat alone': the seeds on which a "
          f"distilled student's {first} beat the same-depth student alone")
    header = f"{'model':<24}" + "".join(f"{m:>20}" for m in metrics)
    print(header + f"{'parameters':>13}{'speed-up':>10}{'beat alone':>12}")
    for name, row in models.items():
        cells = "".join(f"{common.pm(row[m], row[f'{m}_std']):>20}" for m in metrics)
        wins = next((f"{v['better']}/{len(args.seeds)}" for k, v in row.items()
                     if k.startswith("vs_")), "")
        print(f"{name:<24}{cells}{row['parameters']:>13,d}{row['speedup']:>9.1f}x{wins:>12}")
    print(f"{results['run']['seconds']:.0f} s")
    print(f"wrote {common.write_results(args.output_dir, results)}")
    return results


# ------------------------------------------------------------------------ training
def batches_of(examples, collate: Callable, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Fixed evaluation batches, in order."""
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def loader(examples, collate: Callable, args) -> torch.utils.data.DataLoader:
    # a seeded generator: the same shuffles on every run and for every model
    return common.shuffled(examples, args.batch_size, args.seed, collate)


def train_config(args, name: str, device, epochs: int) -> TrainingConfig:
    # one checkpoint (gs{step}.pkl), after the last epoch: the tables show the final models
    return TrainingConfig(device=device, output_dir=os.path.join(args.output_dir, name),
                          ckpt_epoch_frequency=epochs, seed=args.seed, log_steps=100)


def optimizer_and_schedule(model: torch.nn.Module, lr: float, total_steps: int,
                           warmup: float = 0.0) -> Tuple[torch.optim.Optimizer, Dict[str, Any]]:
    """:func:`_common.optimizer_and_schedule` (AdamW, a linear decay to zero over
    ``total_steps``), with a linear warm-up over the first ``warmup`` fraction of the steps
    when ``warmup`` > 0."""
    optimizer, schedule = common.optimizer_and_schedule(model, lr, total_steps)
    if warmup > 0:
        ramp = max(1, round(warmup * total_steps))
        schedule["scheduler_args"] = {"lr_lambda": lambda step: min(
            (step + 1) / ramp, max(0.0, (total_steps - step) / max(1, total_steps - ramp)))}
    return optimizer, schedule


def train_alone(name: str, model, adaptor: Callable, examples, collate: Callable, args,
                device, epochs: int, lr: Optional[float] = None, warmup: float = 0.0) -> None:
    """Supervised training on the labels (the model's own loss): the teacher, or a student
    baseline. AdamW at ``lr`` (default ``args.lr``) with a linear decay to zero, after a
    linear warm-up over the first ``warmup`` fraction of the steps."""
    data = loader(examples, collate, args)
    optimizer, scheduler = optimizer_and_schedule(model, args.lr if lr is None else lr,
                                                  epochs * len(data), warmup)
    common.fit(BasicTrainer(train_config(args, name, device, epochs), model, adaptor),
               optimizer, data, num_epochs=epochs, **scheduler)


def distil(name: str, teacher, student, layers: int, adaptor: Callable, examples,
           collate: Callable, args, device, batch_postprocessor: Optional[Callable] = None,
           lr: Optional[float] = None, warmup: float = 0.0,
           **config_options: Any) -> None:
    """``GeneralDistiller``, TinyBERT-style, for ``args.epochs`` epochs: KD on the logits
    (``ce`` at ``args.temperature``) + the hard labels + TinyBERT's layer mapping
    (``tinybert_layer_mapping``: ``hidden_mse`` through a learned projection, embeddings
    included, and ``attention_mse``); ``config_options`` go to the ``DistillationConfig``.
    Both models are asked for their hidden states and attentions on every batch. AdamW at
    ``lr`` (default ``args.lr``), schedule as in :func:`train_alone`."""
    matches = tinybert_layer_mapping(args.teacher_config["num_hidden_layers"], layers,
                                     args.teacher_config["hidden_size"],
                                     args.student_config["hidden_size"],
                                     features=("hidden", "attention"))
    config = DistillationConfig(temperature=args.temperature, kd_loss_type="ce",
                                kd_loss_weight=1.0, hard_label_weight=1.0,
                                intermediate_matches=matches, **config_options)
    data = loader(examples, collate, args)
    optimizer, scheduler = optimizer_and_schedule(student, args.lr if lr is None else lr,
                                                  args.epochs * len(data), warmup)
    distiller = GeneralDistiller(train_config(args, name, device, args.epochs), config,
                                 model_T=teacher, model_S=student, adaptor_T=adaptor,
                                 adaptor_S=adaptor)
    common.fit(distiller, optimizer, data, num_epochs=args.epochs, **scheduler,
               batch_postprocessor=batch_postprocessor, output_hidden_states=True,
               output_attentions=True)


# ------------------------------------------------------------------------ the BERTs
# The text examples' architectures (vocab_size, num_labels and max_position_embeddings
# are added at run time, the student's depth too: --student-layers).
TEACHER_CONFIG = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4,
                      intermediate_size=128, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, type_vocab_size=1)
STUDENT_CONFIG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      type_vocab_size=1)
# --quick: the same shapes, scaled down so that the tests take seconds (4-layer teacher)
QUICK_TEACHER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64)
QUICK_STUDENT = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)


def parser(doc: str, output_dir: str, data_help: str, epochs: Tuple[int, int],
           teacher_epochs: Tuple[int, int]) -> "common.ExampleParser":
    """A text example's command line: ``--output-dir``, ``--quick``, ``--data`` (a directory
    of real data, ``data_help``; default the offline stdlib task) and the ``(quick, full)``
    ``--epochs`` of each student and ``--teacher-epochs``; the example adds its own
    options, and :func:`parse_args` the common ones."""
    result = common.ExampleParser(doc, output_dir, quick_help="a tiny run, for tests")
    result.add_argument("--data", default=None, help=data_help)
    result.add_quick_argument("--epochs", *epochs, "epochs of each student run")
    result.add_quick_argument("--teacher-epochs", *teacher_epochs, "epochs of the teacher")
    return result


def parse_args(parser: "common.ExampleParser", argv, min_length: int,
               run_seeds: bool = True, **changes: Any) -> argparse.Namespace:
    """Adds the text examples' common options (``--vocab-size``, ``--lr``, ``--batch-size``,
    ``--temperature`` of KD, ``--seeds`` (each one whole run, teacher included:
    :func:`over_seeds`; ``args.seed`` is the first) or, without ``run_seeds``, ``--seed``
    (for an example whose own ``--seeds`` are its students'), ``--device``) and parses;
    sets the sizes (:func:`choose_sizes`, with ``changes``), checks ``--student-layers``
    (a comma-separated string becomes a list of depths) and that ``--max-length`` is at
    least ``min_length``."""
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_training_options(lr=1e-3, temperature=4.0)
    if run_seeds:
        parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                            help="one whole run (teacher, students) per seed, then mean ± "
                                 "std over them (default: 0)")
    else:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_device()
    args = parser.parse_args(argv)
    choose_sizes(args, **changes)
    depths = student_depths(parser, args)
    if isinstance(args.student_layers, str):
        args.student_layers = depths
    if args.max_length < min_length:
        parser.error(f"--max-length must be at least {min_length}, got {args.max_length}")
    if run_seeds:
        if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) < len(args.seeds):
            parser.error(f"--seeds must be distinct and non-negative, got {args.seeds}")
        args.seed = args.seeds[0]
    return args


def start(args) -> Tuple[float, torch.device]:
    """The start of a run: the clock, every generator seeded with ``args.seed``, and the
    device. Returns ``(time.perf_counter(), device)``."""
    started = time.perf_counter()
    seed_everything(args.seed)
    return started, torch.device(args.device)


def choose_sizes(args, **changes: Any) -> None:
    """Sets ``args.teacher_config`` and ``args.student_config``: the configs above (scaled
    down with ``--quick``), with ``changes`` (e.g. ``type_vocab_size=2``) to both."""
    teacher, student = dict(TEACHER_CONFIG, **changes), dict(STUDENT_CONFIG, **changes)
    if args.quick:
        teacher, student = dict(teacher, **QUICK_TEACHER), dict(student, **QUICK_STUDENT)
    args.teacher_config, args.student_config = teacher, student


def student_depths(parser, args) -> List[int]:
    """``--student-layers`` (``'2'`` or ``'3,4,6'``) as a list, each depth in 1..the
    teacher's layers."""
    try:
        depths = [int(x) for x in str(args.student_layers).split(",")]
    except ValueError:
        parser.error(f"--student-layers must be comma-separated ints, got {args.student_layers!r}")
    depth = args.teacher_config["num_hidden_layers"]
    for layers in depths:
        if not 1 <= layers <= depth:
            parser.error(f"--student-layers: {layers} is not in 1..{depth} (the teacher's "
                         f"layers)")
    return depths


def train_teacher(build: Callable, adaptor: Callable, setup: Dict[str, Any], examples,
                  collate: Callable, args, device) -> torch.nn.Module:
    """The teacher, ``build(args.teacher_config, 0, setup)`` with seed ``args.seed``,
    trained alone for ``args.teacher_epochs``."""
    torch.manual_seed(args.seed)
    teacher = build(args.teacher_config, 0, setup).to(device)
    print(f"teacher ({args.teacher_epochs} epochs)")
    train_alone("teacher", teacher, adaptor, examples, collate, args, device,
                args.teacher_epochs)
    return teacher


def initial_student(build: Callable, layers: int, setup: Dict[str, Any],
                    args) -> torch.nn.Module:
    """A ``layers``-layer student, its weights drawn with seed ``args.seed + layers``: each
    run of that depth starts from a copy of them."""
    torch.manual_seed(args.seed + layers)
    return build(args.student_config, layers, setup)


def alone_and_distilled(teacher, build: Callable, adaptor: Callable, layers: int,
                        setup: Dict[str, Any], examples, collate: Callable, args, device,
                        alone_lr: Optional[float] = None, distil_lr: Optional[float] = None
                        ) -> Tuple[torch.nn.Module, Dict[str, torch.nn.Module]]:
    """The ``layers``-layer student trained alone (at ``alone_lr``) and distilled
    (:func:`distil`, at ``distil_lr``; both default ``args.lr``) from the same initial
    weights, ``args.epochs`` each. Returns the initial weights and
    ``{'student_alone_L{layers}': ..., 'distilled_student_L{layers}': ...}``."""
    initial = initial_student(build, layers, setup, args)
    print(f"{layers}-layer student alone ({args.epochs} epochs)")
    alone = copy.deepcopy(initial).to(device)
    train_alone(f"student_alone_L{layers}", alone, adaptor, examples, collate, args, device,
                args.epochs, lr=alone_lr)
    print(f"{layers}-layer student distilled ({args.epochs} epochs)")
    distilled = copy.deepcopy(initial).to(device)
    distil(f"distilled_student_L{layers}", teacher, distilled, layers, adaptor, examples,
           collate, args, device, lr=distil_lr)
    return initial, {f"student_alone_L{layers}": alone,
                     f"distilled_student_L{layers}": distilled}
