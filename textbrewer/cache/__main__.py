"""Command line: build a teacher cache, or describe and verify one.

    python -m textbrewer.cache build --factory my_pkg.teach:make --output DIR --k 32
    python -m textbrewer.cache info DIR

The factory is ``module:function``, imported from ``sys.path`` (the current folder and
``PYTHONPATH``). It is called with no arguments and returns either ``(teacher, dataset)``
or a dict with ``'teacher'`` and ``'dataset'`` and, optionally, ``'collate_fn'`` and
``'logits_fn'`` (the arguments of :func:`~textbrewer.cache.write_teacher_cache`). The
dataset yields dicts with ``input_ids`` (L,) and optional ``attention_mask``/``labels``.

Exit codes: 0 success; 1 the cache or the data is wrong (the message names the path and
the problem); 2 a usage error (bad arguments, a factory that cannot be imported or
returns something else).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Dict, List, Optional

from .manifest import POSITION_RULES
from .reader import TeacherCache
from .writer import write_teacher_cache

EXIT_OK, EXIT_BAD_CACHE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or the factory: exit code 2."""


def load_factory(spec: str) -> Dict[str, Any]:
    """Import ``module:function``, call it, and normalise its result to a dict."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"--factory {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--factory {spec!r}: cannot import {module_name!r} ({error}); is "
                         f"its folder on PYTHONPATH?") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UsageError(f"--factory {spec!r}: module {module_name!r} has no callable "
                         f"{function_name!r}")
    made = factory()
    if isinstance(made, dict):
        unknown = set(made) - {"teacher", "dataset", "collate_fn", "logits_fn"}
        if "teacher" not in made or "dataset" not in made or unknown:
            raise UsageError(f"--factory {spec!r} returned a dict with keys {sorted(made)}; "
                             f"expected 'teacher', 'dataset' and optionally 'collate_fn', "
                             f"'logits_fn'")
        return made
    if isinstance(made, (tuple, list)) and len(made) == 2:
        return {"teacher": made[0], "dataset": made[1]}
    raise UsageError(f"--factory {spec!r} returned {type(made).__name__}; expected "
                     f"(teacher, dataset) or a dict with 'teacher' and 'dataset'")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m textbrewer.cache",
        description="Offline teacher top-k outputs for language-model distillation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser(
        "build", help="run a teacher over a dataset and write a cache",
        description="Run a teacher over a dataset once and write its top-k log-probs. "
                    "The factory is a zero-argument 'module:function' returning "
                    "(teacher, dataset) or a dict with 'teacher', 'dataset' and optionally "
                    "'collate_fn', 'logits_fn'.")
    build.add_argument("--factory", required=True, metavar="MODULE:FUNCTION")
    build.add_argument("--output", required=True, metavar="DIR", help="the cache folder")
    build.add_argument("--k", required=True, type=int, help="top-k entries per token")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--device", default=None,
                       help="e.g. cpu, cuda, cuda:1 (default: the teacher's device)")
    build.add_argument("--positions", choices=sorted(POSITION_RULES), default="attention_mask",
                       help="which positions get a row")
    build.add_argument("--shard-tokens", type=int, default=1_000_000, help="rows per shard")
    build.add_argument("--fingerprint", choices=("full", "structure"), default="full",
                       help="hash every weight (full) or only names/shapes/dtypes")
    build.add_argument("--overwrite", action="store_true",
                       help="replace the cache already in DIR")
    build.add_argument("--progress", action="store_true", help="show a progress bar")
    info = commands.add_parser("info", help="describe a cache and verify its files",
                               description="Print a cache's manifest summary and bytes per "
                                           "token, and verify its files.")
    info.add_argument("path", metavar="DIR")
    info.add_argument("--verify", choices=("checksum", "size"), default="checksum",
                      help="checksum: sha256 of every file (default); size: sizes only")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def _build(args: argparse.Namespace) -> int:
    if args.k < 1 or args.batch_size < 1 or args.shard_tokens < 1:
        raise UsageError("--k, --batch-size and --shard-tokens must be >= 1")
    made = load_factory(args.factory)
    manifest = write_teacher_cache(
        made["teacher"], made["dataset"], args.output, args.k, batch_size=args.batch_size,
        collate_fn=made.get("collate_fn"), device=args.device,
        logits_fn=made.get("logits_fn"), positions=args.positions,
        shard_tokens=args.shard_tokens, overwrite=args.overwrite,
        fingerprint=args.fingerprint, progress=args.progress)
    print(f"wrote {args.output}")
    print(manifest.summary())
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    cache = TeacherCache(args.path, verify="size")
    if args.json:
        print(json.dumps(cache.manifest.to_dict(), indent=1))
    else:
        print(cache.manifest.summary())
    files = cache.manifest.files()
    if args.verify == "checksum":
        cache.verify()
        print(f"verification  OK: sha256 and size of {len(files)} files match the manifest")
    else:
        print(f"verification  OK: sizes of {len(files)} files match (checksums not read)")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _info(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, IndexError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_CACHE


if __name__ == "__main__":
    sys.exit(main())
