"""The test suite's time at another revision and at this checkout, side by side, rounds alternating.

    python bench/suite.py --base 95dee94 [--rounds 2]

Each run is `make test`'s pytest command (without ruff) on a cold start: a fresh TMPDIR, so that
torch.compile's caches and precompiled headers are built again, as on a new machine.  The base
runs in a git worktree beside this checkout (../shared stays where the tests look for it),
removed afterwards.  This machine's speed drifts by 10-20 % within minutes: rounds alternate
base and head, and the ratio is of the medians of pytest's own seconds.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import base_against_head

PYTEST = [sys.executable, "-m", "pytest", "-q", "-n", "auto", "--dist", "loadfile", "-p", "no:cacheprovider"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_suite(tree: Path, label: str) -> float:
    """pytest's own seconds for the suite in ``tree``, printed with the run's wall, CPU and counts."""
    with tempfile.TemporaryDirectory(prefix="suite-") as fresh:
        cpu, started = children_cpu(), time.monotonic()
        environment = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
        result = subprocess.run(PYTEST, cwd=tree, capture_output=True, text=True, env={**environment, "TMPDIR": fresh})
        wall, cpu = time.monotonic() - started, children_cpu() - cpu
    summaries = re.findall(r"^=* ?(.* in ([\d.]+)s\b.*?) ?=*$", result.stdout, re.MULTILINE)
    summary, seconds = summaries[-1] if summaries else ("no summary: pytest did not finish", "nan")
    print(f"{label:>5}: pytest {float(seconds):6.1f} s, wall {wall:6.1f} s, CPU {cpu:6.1f} s | {summary}", flush=True)
    return float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=1, help="base-then-head pairs (default 1)")
    args = parser.parse_args()
    base_against_head(args.base, args.rounds, run_suite, "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
