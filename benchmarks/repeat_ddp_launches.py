"""Launches the suite's 2-process DDP runs (gloo, CPU, under torchrun) many times and counts
how they exit: a reliability figure for process teardown, not a test.

Each launch is one of the runs the DDP tests make, taken in turn: ``tests/ddp_worker.py``
in modes ``general``, ``adversarial`` (and ``lm`` when transformers is installed), and
``tests/ddp_faults_worker.py`` in modes ``unused``, ``barrier`` and ``nan``. All are tiny
models and a few optimizer steps (a few seconds each on 2 CPU cores).

A launch counts as

* an abort when a worker died of SIGABRT (torchrun reports ``exitcode: -6``, or a worker
  printed ``terminate called ...``): a native thread still running at interpreter exit;
* a failure when it exited non-zero otherwise, timed out, or did not write every rank's
  result file;
* fine otherwise.

Prints one JSON object: ``{"launches", "aborts", "failures", "by_mode", "returncodes",
"worker_exitcodes", "seconds"}`` (``returncodes``: torchrun's, 1 when a worker failed;
``worker_exitcodes``: the failed workers' own, as torchrun reports them, -6 for SIGABRT);
the output of each bad launch is kept under ``--logs`` when given.

    python benchmarks/repeat_ddp_launches.py 100
    python benchmarks/repeat_ddp_launches.py 20 --modes general,unused --logs /tmp/ddp_logs
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# mode -> (worker script, argv after the script given the output folder)
RUNS = {
    "general": ("ddp_worker.py", lambda out: [out, "general"]),
    "adversarial": ("ddp_worker.py", lambda out: [out, "adversarial"]),
    "lm": ("ddp_worker.py", lambda out: [out, "lm"]),
    "unused": ("ddp_faults_worker.py", lambda out: ["unused", out]),
    "barrier": ("ddp_faults_worker.py", lambda out: ["barrier", out]),
    "nan": ("ddp_faults_worker.py", lambda out: ["nan", out]),
}
RESULT_FILE = {"ddp_worker.py": "rank{rank}.json", "ddp_faults_worker.py": "rank{rank}.txt"}
_ABORT = re.compile(r"exitcode\s*:\s*-6\b|SIGABRT|terminate called")
_WORKER_EXIT = re.compile(r"exitcode\s+:\s*(-?\d+)")  # one per worker in the summary


def default_modes() -> list:
    modes = ["general", "adversarial", "unused", "barrier", "nan"]
    if importlib.util.find_spec("transformers") is not None:
        modes.insert(2, "lm")
    return modes


def launch(mode: str, output_dir: str, timeout: float) -> tuple:
    """Runs one 2-process launch; returns (kind, returncode, output)."""
    script, argv = RUNS[mode]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TEXTBREWER_VERBOSITY="warning",
                       PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    os.makedirs(output_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", os.path.join(TESTS, script), *argv(output_dir)]
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") if isinstance(
            error.stdout, bytes) else (error.stdout or "")
        return "failure", "timeout", output
    output = result.stdout + result.stderr
    if result.returncode != 0:
        kind = "abort" if result.returncode in (-6, 134) or _ABORT.search(output) else "failure"
        return kind, result.returncode, output
    missing = [rank for rank in range(2) if not os.path.exists(
        os.path.join(output_dir, RESULT_FILE[script].format(rank=rank)))]
    if missing:
        return "failure", 0, output + f"\n[repeat_ddp_launches] no result file of rank(s) {missing}"
    return "ok", 0, output


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launches", nargs="?", type=int, default=100,
                        help="how many launches (default 100)")
    parser.add_argument("--modes", default=",".join(default_modes()),
                        help=f"comma-separated runs taken in turn, from {sorted(RUNS)} "
                             f"(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=240,
                        help="seconds before a launch counts as a failure (default 240)")
    parser.add_argument("--logs", default=None,
                        help="folder that keeps the output of every bad launch")
    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(RUNS))
    if unknown or not modes:
        parser.error(f"unknown mode(s) {unknown}; valid: {sorted(RUNS)}")
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    counts = collections.Counter()
    by_mode = {mode: collections.Counter() for mode in modes}
    returncodes = collections.Counter()
    worker_exitcodes = collections.Counter()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="repeat_ddp_") as scratch:
        for index in range(args.launches):
            mode = modes[index % len(modes)]
            kind, returncode, output = launch(mode, os.path.join(scratch, str(index)),
                                              args.timeout)
            counts[kind] += 1
            by_mode[mode][kind] += 1
            returncodes[str(returncode)] += 1
            if kind != "ok":
                worker_exitcodes.update(_WORKER_EXIT.findall(output))
                print(f"launch {index} ({mode}): {kind}, return code {returncode}",
                      file=sys.stderr, flush=True)
                if args.logs:
                    with open(os.path.join(args.logs, f"launch{index}_{mode}_{kind}.log"),
                              "w", encoding="utf-8") as handle:
                        handle.write(output)
    report = {"launches": args.launches, "aborts": counts["abort"],
              "failures": counts["failure"],
              "by_mode": {mode: dict(counter) for mode, counter in by_mode.items()},
              "returncodes": dict(returncodes), "worker_exitcodes": dict(worker_exitcodes),
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
