"""CPU time of a gunicorn worker's start (fork to "model loaded") at another revision and at this
checkout, side by side, runs alternating.

    python bench/worker_start.py --base 06a843e [--runs 5]

One worker, one torch thread, on torch, serving a tiny checkpoint: the start is then mostly imports
and the app, which is what the service's worker hooks (app/gunicorn.conf.py) change.  The worker's
CPU seconds are read from /proc when it logs that its model is loaded.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import base_against_head

from tests.servers import free_port
from tests.tiny_checkpoint import make_checkpoint


def worker_start_cpu(tree: Path, checkpoint: Path, folder: Path) -> float:
    environment = dict(os.environ, SEG_CHECKPOINT=str(checkpoint), SEG_RESULTS_DIR=str(folder / "results"),
                       SEG_BIND=f"127.0.0.1:{free_port()}", SEG_WORKERS="1", SEG_THREADS="1", SEG_BACKEND="torch",
                       PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(dir=folder))
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
                              cwd=tree, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            loaded = re.search(r"worker (\d+): model loaded", server.stderr.readline())
            if loaded:
                fields = Path(f"/proc/{loaded.group(1)}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        raise RuntimeError("the worker did not load its model within 2 minutes")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--runs", type=int, default=5, help="starts of each (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint = make_checkpoint(folder / "tiny.pth", varied=True)

        def measure(tree: Path, label: str) -> float:
            seconds = worker_start_cpu(tree, checkpoint, folder)
            print(f"{label:>5}: {seconds:.2f} s of CPU", flush=True)
            return seconds
        base_against_head(args.base, args.runs, measure, "s of CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
