"""Shared parts of the text examples: offline data from Python's standard library, readers
for the usual formats (SST-2 TSV, CoNLL-2003, SQuAD JSON), a word-level vocabulary, and
the timing / table helpers.

Nothing here downloads anything. The offline data sets are built from the ``.py`` files of
the running Python's standard library (``sysconfig.get_paths()['stdlib']``), read with
``ast`` and ``tokenize`` without importing them; the test suites, ``idlelib``, ``lib2to3``,
``turtledemo``, ``ensurepip`` and ``site-packages`` are left out. Their exact content
follows the Python version (the numbers in examples/README.md are from Python 3.11).
"""
from __future__ import annotations

import ast
import collections
import io
import json
import keyword
import os
import re
import sysconfig
import time
import tokenize
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from textbrewer import BasicTrainer, TrainingConfig

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
    paths = stdlib_files(single_modules=True)
    if max_files is not None:
        paths = paths[::max(1, len(paths) // max_files)][:max_files]  # spread over the library
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
                 seed: int = 0) -> Dict[str, Any]:
    """"Which function does this docstring describe?", as extractive QA.

    For every stdlib single-file module, its documented functions and methods are taken in
    order in groups of ``candidates``. For each function of a group one example is made:
    the *question* is its docstring's summary (the first sentence of the first paragraph,
    at most ``question_length`` words); the *context* lists the group's functions, in an
    order shuffled per example, each as ``def <name> ( <arguments> ) : <summary> ;``; the
    *answer* is the function's name, split at underscores (``get _ config _ var``), so the
    answer is a span of one or more tokens. Each file goes to one split.
    """
    import random
    rng = random.Random(seed)
    paths = stdlib_files(single_modules=True)
    if max_files is not None:
        paths = paths[::max(1, len(paths) // max_files)][:max_files]
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
                order = list(range(len(group)))
                rng.shuffle(order)
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
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
        for _ in range(3):  # warm-up: the first calls of a model are slower
            model(**batches[0])
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.process_time()
            for batch in batches:
                model(**batch)
            best[name] = min(best[name], (time.process_time() - started) / len(batches))
    for name, model in models.items():
        model.train(modes[name])
    return best


def print_table(models: Dict[str, Dict[str, Any]], metrics: Sequence[str]) -> None:
    """One row per model: its metrics, parameters and speed-up over the teacher."""
    widths = [max(10, len(m)) + 2 for m in metrics]
    header = f"{'model':<24}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, widths))
    print(header + f"{'parameters':>13}{'speed-up':>10}")
    for name, row in models.items():
        cells = "".join(f"{row[m]:>{w}.4f}" for m, w in zip(metrics, widths))
        print(f"{name:<24}{cells}{row['parameters']:>13,d}{row['speedup']:>9.1f}x")


def write_results(output_dir: str, results: Dict[str, Any]) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return path


# ------------------------------------------------------------------------ training
def batches_of(examples, collate: Callable, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Fixed evaluation batches, in order."""
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def loader(examples, collate: Callable, args) -> torch.utils.data.DataLoader:
    # a seeded generator: the same shuffles on every run and for every model
    return torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True,
                                       collate_fn=collate,
                                       generator=torch.Generator().manual_seed(args.seed))


def optimizer_and_schedule(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW and a linear decay to zero, passed to the distiller as ``scheduler_class`` (so
    the projections it adds to the optimizer are scheduled too)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return optimizer, dict(scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                           scheduler_args={"lr_lambda": lambda s: max(0.0, 1 - s / total_steps)})


def train_config(args, name: str, device, epochs: int) -> TrainingConfig:
    # one checkpoint (gs{step}.pkl), after the last epoch: the tables show the final models
    return TrainingConfig(device=device, output_dir=os.path.join(args.output_dir, name),
                          ckpt_epoch_frequency=epochs, seed=args.seed, log_steps=100)


def train_alone(name: str, model, adaptor: Callable, examples, collate: Callable, args,
                device, epochs: int) -> None:
    """Supervised training on the labels (the model's own loss): the teacher, or a student
    baseline."""
    data = loader(examples, collate, args)
    optimizer, scheduler = optimizer_and_schedule(model, args.lr, epochs * len(data))
    with BasicTrainer(train_config(args, name, device, epochs), model, adaptor) as trainer:
        trainer.train(optimizer, data, num_epochs=epochs, **scheduler)
