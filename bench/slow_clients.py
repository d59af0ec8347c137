"""Slow clients against the service: can they take it away from everyone else?

    python bench/slow_clients.py [--setups gunicorn,front] [--slow 32] [--duration 60] [--checkpoint FILE]

For each setup it starts the service on a free loopback port with its defaults (2 workers x 2
request threads) on the default model: ``gunicorn`` alone (as `make run` started it before
serve.py), or ``front``, serve.py (nginx in front of gunicorn, as `make run` starts it now).  A
normal client posts a real photo to /json every --interval seconds (20 s timeout): first alone
(the unloaded latency), then for --duration seconds while --slow connections send a byte every
2 s, half of them trickling their headers, half a multipart body after whole headers (a closed
one is opened again, so that there are always that many).  After the slow ones stop it counts
the threads and open descriptors of gunicorn's workers (and nginx's) against before.  Prints one
row per setup, the CPU's flags, and last ``ratio: X.XX``: the front's loaded p99 over its
unloaded p99 (goal <= 2, with every answer).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from benchlib import ROOT, background_load, machine, percentile, photo_jpeg

from app.settings import DEFAULT_CHECKPOINT

COMMANDS = {"gunicorn": [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
            "front": [sys.executable, "app/serve.py"]}
BYTE_EVERY_S = 2.0
CLIENT_TIMEOUT_S = 20
P99_GOAL = 2.0  # loaded p99 / unloaded p99
BOUNDARY = "slowclientboundary"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # it ended while we looked
            continue
    return sorted(found)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def threads_and_descriptors(pids: list[int]) -> tuple[int, int]:
    """Threads (/proc/PID/task) and open descriptors (/proc/PID/fd) of ``pids``, summed."""
    threads = descriptors = 0
    for pid in pids:
        try:
            threads += len(os.listdir(f"/proc/{pid}/task"))
            descriptors += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return threads, descriptors


class Server:
    """The service as ``setup`` starts it, on a free port; its log lines counted as they come."""

    def __init__(self, setup: str, checkpoint: str, results: Path) -> None:
        self.port = free_port()
        environment = dict(os.environ, SEG_CHECKPOINT=checkpoint, SEG_RESULTS_DIR=str(results),
                           SEG_BIND=f"127.0.0.1:{self.port}")
        self.process = subprocess.Popen(COMMANDS[setup], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.loaded = self.timeouts = 0
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.loaded += "model loaded" in line  # app/gunicorn.conf.py's post_worker_init
            self.timeouts += '" 408 ' in line  # nginx's access log: a client too slow

    def wait_until_loaded(self, workers: int = 2, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while self.loaded < workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the service did not load {workers} workers (exit {self.process.poll()})")
            time.sleep(0.2)

    def processes(self) -> dict[str, list[int]]:
        """gunicorn's workers, and nginx's processes behind the front."""
        top = self.process.pid
        if "gunicorn" in command_line(top):
            return {"gunicorn workers": children(top)}
        found = {"gunicorn workers": [], "nginx": []}
        for pid in children(top):
            if "gunicorn" in command_line(pid):
                found["gunicorn workers"] = children(pid)
            elif "nginx" in command_line(pid):
                found["nginx"] = [pid, *children(pid)]
        return found

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=90)


def slow_connection(port: int, trickle_body: bool, stop: threading.Event, closed: list[int]) -> None:
    """One slow client for as long as ``stop`` is unset: a byte every 2 s of the headers, or of a
    multipart body after whole headers; opened again when the server closes it (counted in ``closed``)."""
    head = (f"POST /json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n").encode()
    body = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n\r\n'.encode()
    trickled = body + b"\xff" * 100000 if trickle_body else head
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                if trickle_body:
                    connection.sendall(head)
                for byte in trickled:
                    connection.sendall(bytes([byte]))
                    if stop.wait(BYTE_EVERY_S):
                        return
        except OSError:  # closed by the server: a new slow client takes its place
            closed.append(1)
            stop.wait(0.1)


@dataclasses.dataclass
class Normal:
    latencies: list[float]  # seconds, answered requests, ascending
    failed: int


def normal_client(url: str, jpeg: bytes, seconds: float, interval: float) -> Normal:
    """A photo to /json every ``interval`` seconds for ``seconds`` (each waits for the previous)."""
    latencies, failed = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            ok = requests.post(url + "/json", files={"file": ("photo.jpg", jpeg)}, timeout=CLIENT_TIMEOUT_S).ok
        except requests.RequestException:
            ok = False
        took = time.perf_counter() - started
        if ok:
            latencies.append(took)
        else:
            failed += 1
        time.sleep(max(0.0, interval - took))
    return Normal(sorted(latencies), failed)


def summary(result: Normal) -> str:
    if not result.latencies:
        return f"0 of {result.failed} answered"
    p50, p99 = (percentile(result.latencies, f) * 1000 for f in (0.50, 0.99))
    total = len(result.latencies) + result.failed
    longest = result.latencies[-1] * 1000
    return f"{len(result.latencies)} of {total} answered, p50 {p50:.0f} p99 {p99:.0f} max {longest:.0f} ms"


def run_setup(setup: str, args: argparse.Namespace, jpeg: bytes, results: Path) -> float | None:
    """One row of the table; returns loaded p99 / unloaded p99 when every request was answered."""
    with Server(setup, args.checkpoint, results) as server:
        server.wait_until_loaded()
        normal_client(server.url, jpeg, args.warmup, 0)
        unloaded = normal_client(server.url, jpeg, args.unloaded, args.interval)
        before = {name: threads_and_descriptors(pids) for name, pids in server.processes().items()}
        stop, closed = threading.Event(), []
        slow = [threading.Thread(target=slow_connection, args=(server.port, n % 2 == 1, stop, closed), daemon=True)
                for n in range(args.slow)]
        for thread in slow:
            thread.start()
        loaded = normal_client(server.url, jpeg, args.duration, args.interval)
        stop.set()
        for thread in slow:
            thread.join(timeout=30)
        time.sleep(args.settle)  # the server's side of the closed connections goes
        after = {name: threads_and_descriptors(pids) for name, pids in server.processes().items()}
        left = "; ".join(f"{name} threads {before[name][0]} -> {after[name][0]}, fds {before[name][1]} -> "
                         f"{after[name][1]}" for name in before)
        print(f"{setup:<9} unloaded: {summary(unloaded)} | {args.slow} slow: {summary(loaded)}, "
              f"failed {loaded.failed}; slow ones closed by the server {len(closed)} (408 logged "
              f"{server.timeouts}) | after: {left}", flush=True)
    if loaded.failed or not loaded.latencies or not unloaded.latencies:
        return None
    return percentile(loaded.latencies, 0.99) / percentile(unloaded.latencies, 0.99)


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as info:
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    wanted = sorted({flag for flag in flags if flag == "avx2" or flag.startswith(("avx512", "amx"))})
    return " ".join(wanted) or "none of avx2/avx512/amx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--setups", default="gunicorn,front", help="comma-separated: gunicorn, front")
    parser.add_argument("--slow", type=int, default=32, help="slow connections (half headers, half bodies)")
    parser.add_argument("--duration", type=float, default=60, help="seconds under slow clients")
    parser.add_argument("--unloaded", type=float, default=20, help="seconds of the normal client alone first")
    parser.add_argument("--interval", type=float, default=2, help="seconds between the normal client's requests")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--settle", type=float, default=3, help="seconds after the slow ones stop, before counting")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"error: checkpoint not found: {args.checkpoint} (pass --checkpoint)")
    setups = args.setups.split(",")
    if not set(setups) <= set(COMMANDS):
        sys.exit(f"error: --setups takes {', '.join(COMMANDS)}, not {args.setups!r}")
    print(background_load() + machine())
    print(f"CPU flags: {cpu_flags()}")
    print(f"{Path(args.checkpoint).name}, 640x480 JPEG every {args.interval:g} s, {args.slow} slow connections "
          f"(a byte every {BYTE_EVERY_S:g} s) for {args.duration:g} s, client timeout {CLIENT_TIMEOUT_S} s")
    ratios = {}
    with tempfile.TemporaryDirectory() as folder:
        for setup in setups:
            ratios[setup] = run_setup(setup, args, photo_jpeg(), Path(folder))
    if "front" in ratios:
        ratio = ratios["front"]
        print("ratio: n/a (a request failed)" if ratio is None else f"ratio: {ratio:.2f} (goal <= {P99_GOAL:g})")


if __name__ == "__main__":
    main()
