"""The ``textbrewer`` command (also ``python -m textbrewer``).

    textbrewer distill CONFIG.yaml [key=value ...] [--resume]
    textbrewer plan CONFIG.yaml [key=value ...]
    textbrewer config CONFIG.yaml [key=value ...]

``distill`` trains the job the file describes (:mod:`textbrewer.job`), ``plan`` prints
the estimated peak memory of each loss path without loading weights, ``config`` prints
the resolved config (every key, absolute paths) and exits. Overrides use OmegaConf's
dot-list syntax (``training.steps=100``, ``teacher=null``).

Exit codes: 0 success; 2 a wrong config or command line (the message names the key);
anything that fails during training raises with its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

EXIT_OK, EXIT_CONFIG = 0, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textbrewer", description="Knowledge distillation jobs from config files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("distill", "train the job's student"),
                            ("plan", "estimate the job's peak memory per loss path"),
                            ("config", "print the resolved config and exit")):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("config", metavar="CONFIG.yaml", help="the job's config file")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="overrides applied after the file (training.steps=100)")
        if name == "distill":
            command.add_argument("--resume", action="store_true",
                                 help="continue the run in output.dir from its newest "
                                      "training state (the config must be the same)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = _parser().parse_args(argv)
    from .job.config import ConfigError, config_to_yaml, load_job_config
    try:
        config = load_job_config(args.config, args.overrides)
        if args.command == "config":
            sys.stdout.write(config_to_yaml(config))
            return EXIT_OK
        if args.command == "plan":
            from .job.plan import plan_job
            sys.stdout.write(plan_job(config) + "\n")
            return EXIT_OK
        from .job.run import run_job
        results = run_job(config, resume=args.resume)
    except ConfigError as error:
        print(f"textbrewer {args.command}: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    validation = results.get("validation")
    summary = (f"validation perplexity {validation['perplexity']:.4f} per token, "
               f"{validation['perplexity_per_byte']:.4f} per byte; " if validation else "")
    print(f"textbrewer distill: {results['steps']} steps, {summary}{results['seconds']:.0f} s;"
          f" wrote {config.output.dir}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
