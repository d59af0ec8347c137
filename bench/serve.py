"""A bounded load test of the service on loopback: throughput and latency under concurrent clients.

    python bench/serve.py [--checkpoint FILE] [--settings 2x1,1x2,2x2] [--clients 4] [--duration 30]
    python bench/serve.py --url http://127.0.0.1:8000 [--checkpoint FILE]
    python bench/serve.py --front --settings 2x2 --bad-every 5 --duration 60   # the soak, through the front

For each setting WORKERSxTHREADS it starts gunicorn (app/gunicorn.conf.py) on a free 127.0.0.1
port with that many workers and torch threads per worker (WORKERSxTHREADSxR: and R request
threads per worker, SEG_THREADS_PER_WORKER), waits until every worker has loaded
the model, warms up, then runs N clients that POST the same 640x480 JPEG to /json for a fixed
time.  Prints requests/s, p50/p95/p99 latency, errors, the workers' RSS before and after, and
the CPU each request cost the workers, the rest of the service and the clients (which share
this machine's cores).  Throughput is compared with the machine's capacity (cores / prediction
time): one prediction of that photo in one thread on the backend and precision the service
picks (SEG_BACKEND, SEG_PRECISION), the faster of its timings before and after each setting's
load.  With --url it loads an already running service instead (no RSS, no CPU shares).
--front starts it as `make run` does (serve.py: nginx in front of gunicorn); --bad-every N
makes every Nth request of each client a bad upload (in turn: not an image, a truncated JPEG,
an empty file, a bad query), which must get its 4xx; anything else counts as an error.  Last
line: ``ratio: X.XX``, the best throughput over that capacity (goal >= 0.8).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from benchlib import ROOT, background_load, cores, machine, median_ms, percentile, photo_jpeg

from app import settings
from app.settings import DEFAULT_CHECKPOINT
from app.uploads import decode_image
from utils.inference.predictor import Predictor

THROUGHPUT_GOAL = 0.8  # x cores / single-request prediction time
TAIL_GOAL = 3.0  # p99 / p50
MAX_REQUESTS = 100_000  # a bound on any one run, whatever the duration


# Bad uploads of the soak, each with the status it must get.
BAD_UPLOADS = ((b"this is not an image", "", 415), (None, "", 400), (b"", "", 400), (b"jpeg", "?rle=2", 400))


@dataclasses.dataclass
class LoadResult:
    latencies: list[float]  # seconds, successful requests only, ascending
    errors: int
    seconds: float
    bad: int = 0  # bad uploads answered with the right 4xx

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds


def one_thread_predictor(checkpoint: str, precision: str, backend: str) -> Predictor:
    """The network on the backend and in the precision the service would pick, in one thread."""
    return Predictor.from_checkpoint(checkpoint, device="cpu", threads=1, precision=precision, backend=backend)


def prediction_ms(predictor: Predictor, jpeg: bytes, repeat: int = 10) -> float:
    """Median one-thread prediction of the photo: what each request costs the cores, HTTP and
    encoding aside."""
    image = decode_image(jpeg, 40_000_000)
    with torch.inference_mode():
        return median_ms(lambda: predictor.predict(image), repeat)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """gunicorn serving ``checkpoint`` with ``workers`` x ``threads``, stopped on exit; ``root``: the
    checkout whose app it runs (another one compares versions)."""

    def __init__(self, checkpoint: str, workers: int, threads: int, precision: str, results: Path,
                 root: Path = ROOT, front: bool = False, request_threads: int | None = None) -> None:
        self.port = free_port()
        environment = dict(os.environ, SEG_CHECKPOINT=checkpoint, SEG_RESULTS_DIR=str(results),
                           SEG_BIND=f"127.0.0.1:{self.port}", SEG_WORKERS=str(workers), SEG_THREADS=str(threads),
                           SEG_PRECISION=precision, SEG_LOG_LEVEL="info")
        if request_threads is not None:
            environment["SEG_THREADS_PER_WORKER"] = str(request_threads)
        self.workers = workers
        self.loaded = 0
        command = ([sys.executable, "app/serve.py"] if front else
                   [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "--access-logfile", "/dev/null",
                    "app:create_app()"])
        self.process = subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._count_loaded_workers, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _count_loaded_workers(self) -> None:
        for line in self.process.stderr:
            if "model loaded" in line:  # logged by gunicorn.conf.py's post_worker_init
                self.loaded += 1

    def wait_until_loaded(self, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while self.loaded < self.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: gunicorn did not load {self.workers} workers (exit {self.process.poll()})")
            time.sleep(0.2)

    def master_pid(self) -> int:
        """gunicorn's master (behind the front, serve.py's gunicorn child)."""
        master = self.process.pid
        if b"gunicorn" not in Path(f"/proc/{master}/cmdline").read_bytes():
            master = next((child for child in children(master)
                           if b"gunicorn" in Path(f"/proc/{child}/cmdline").read_bytes()), master)
        return master

    def worker_pids(self) -> list[int]:
        return children(self.master_pid())

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU used so far by the workers, living and reaped (a respawned worker neither takes its
        predecessor's CPU away nor hides its own), and by the rest of the service (gunicorn's
        master; behind the front, also nginx and serve.py)."""
        master, workers = self.master_pid(), self.worker_pids()
        everything = [self.process.pid, *descendants(self.process.pid)]
        return (sum(map(process_cpu_seconds, workers)) + process_cpu_seconds(master, reaped_children=True),
                sum(process_cpu_seconds(pid) for pid in everything if pid not in workers))

    def rss_mb(self) -> list[float]:
        """Resident memory of each worker (VmRSS in /proc/<pid>/status)."""
        sizes = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
        return sizes

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def children(pid: int) -> list[int]:
    """The processes whose parent (field 4 of /proc/<pid>/stat) is ``pid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren and so on of ``pid``."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def process_cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU of a process so far (fields 14 and 15 of /proc/<pid>/stat), or of its
    children it has reaped (fields 16 and 17); 0 once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    first = 13 if reaped_children else 11
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's CPU (all its threads): what the clients cost the machine's cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def post(url: str, jpeg: bytes, bad: int | None) -> tuple[bool, bool]:
    """POST the photo, or bad upload number ``bad``; returns (answered as it must be, was bad)."""
    if bad is None:
        data, query, status = jpeg, "", 200
    else:
        data, query, status = BAD_UPLOADS[bad % len(BAD_UPLOADS)]
        data = jpeg[: len(jpeg) // 3] if data is None else data  # None: the photo, truncated
    try:
        response = requests.post(url + "/json" + query, files={"file": ("photo.jpg", data)}, timeout=120)
        return response.status_code == status, bad is not None
    except requests.RequestException:
        return False, bad is not None


def load(url: str, jpeg: bytes, clients: int, seconds: float, bad_every: int = 0) -> LoadResult:
    """``clients`` loops posting ``jpeg`` until ``seconds`` have passed (or MAX_REQUESTS in all);
    ``bad_every``: every so many requests of a client is a bad upload instead."""
    deadline = time.monotonic() + seconds
    budget = threading.Semaphore(MAX_REQUESTS)
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"errors": 0, "bad": 0}

    def client() -> None:
        # A new connection per request, as from a proxy or many browsers: a kept-alive connection
        # would pin each client to one worker, so 4 clients could load 2 workers 3:1 for the whole run.
        sent = 0
        while time.monotonic() < deadline and budget.acquire(blocking=False):
            sent += 1
            bad = sent // bad_every if bad_every and sent % bad_every == 0 else None
            started = time.perf_counter()
            ok, was_bad = post(url, jpeg, bad)
            with lock:
                if not ok:
                    counts["errors"] += 1
                elif was_bad:
                    counts["bad"] += 1
                else:
                    latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    return LoadResult(sorted(latencies), counts["errors"], time.monotonic() - started, counts["bad"])


def report(label: str, result: LoadResult, capacity: float, rss: tuple[list[float], list[float]] | None) -> None:
    if not result.latencies:
        print(f"{label:<10} no successful request ({result.errors} errors)")
        return
    p50, p95, p99 = (percentile(result.latencies, f) * 1000 for f in (0.50, 0.95, 0.99))
    memory = ("" if rss is None else
              f"  RSS MB {'/'.join(f'{m:.0f}' for m in rss[0])} -> {'/'.join(f'{m:.0f}' for m in rss[1])}")
    rate = result.requests_per_second
    print(f"{label:<10}{rate:>7.2f} req/s ({rate / capacity:.2f} x capacity)"
          f"  p50 {p50:6.0f}  p95 {p95:6.0f}  p99 {p99:6.0f} ms (p99/p50 {p99 / p50:.2f})"
          f"  errors {result.errors}  requests {len(result.latencies)}  bad ones answered {result.bad}{memory}")


def report_cpu(workers: float, rest: float, clients: float, result: LoadResult) -> None:
    """Where the cores went: on this one machine the clients and the front share them with the workers."""
    answered = len(result.latencies) + result.bad + result.errors
    per_request = (f"{name} {seconds * 1000 / max(1, answered):.0f}" for name, seconds in
                   (("workers", workers), ("rest of the service", rest), ("these clients", clients)))
    print(f"{'':<10}CPU ms per request: {', '.join(per_request)}; "
          f"{(workers + rest + clients) / result.seconds:.2f} of {cores()} cores busy")


def parse_setting(setting: str) -> tuple[int, int, int | None]:
    """WORKERSxTHREADS or WORKERSxTHREADSxREQUEST_THREADS -> (workers, threads, request threads or None)."""
    parts = setting.lower().split("x")
    if len(parts) not in (2, 3) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise SystemExit(f"error: setting {setting!r} is not WORKERSxTHREADS or WORKERSxTHREADSxREQUEST_THREADS "
                         "(positive integers, e.g. 2x2 or 2x2x1)")
    workers, threads, *request_threads = (int(part) for part in parts)
    return workers, threads, request_threads[0] if request_threads else None


def run_setting(setting: str, args: argparse.Namespace, jpeg: bytes, predictor: Predictor, results: Path) -> float:
    """Load the service in this setting; returns its throughput over capacity."""
    workers, threads, request_threads = parse_setting(setting)
    before_ms = prediction_ms(predictor, jpeg)
    with Service(args.checkpoint, workers, threads, args.precision, results, front=args.front,
                 request_threads=request_threads) as service:
        service.wait_until_loaded()
        load(service.url, jpeg, args.clients, args.warmup)
        rss, cpu_before = service.rss_mb(), (*service.cpu_seconds(), own_cpu_seconds())
        result = load(service.url, jpeg, args.clients, args.duration, args.bad_every)
        cpu = [end - start for end, start in zip((*service.cpu_seconds(), own_cpu_seconds()), cpu_before, strict=True)]
        rss = (rss, service.rss_mb())
    capacity = report_capacity(predictor, before_ms, prediction_ms(predictor, jpeg))
    report(setting, result, capacity, rss)
    report_cpu(*cpu, result)
    return result.requests_per_second / capacity


def report_capacity(predictor: Predictor, before_ms: float, after_ms: float) -> float:
    """Cores / the faster of the predictions timed before and after a setting's load: this
    machine's speed drifts, and the faster is the stricter capacity."""
    faster = min(before_ms, after_ms)
    capacity = cores() * 1000 / faster
    print(f"one prediction ({predictor.backend} {predictor.precision}, 1 thread): {before_ms:.1f} ms before, "
          f"{after_ms:.1f} ms after -> capacity {cores()} cores / {faster:.1f} ms = {capacity:.2f} req/s")
    return capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--url", help="load this running service instead of starting gunicorn")
    parser.add_argument("--settings", default="2x1,1x2,2x2",
                        help="WORKERSxTORCH_THREADS[xREQUEST_THREADS], comma-separated")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30, help="seconds of load per setting")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of unrecorded load first")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"), help="SEG_PRECISION")
    parser.add_argument("--front", action="store_true", help="start serve.py (nginx in front), as make run does")
    parser.add_argument("--bad-every", type=int, default=0, help="every Nth request of a client is a bad upload")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        sys.exit(f"error: checkpoint not found: {args.checkpoint} (pass --checkpoint)")
    for setting in [] if args.url else args.settings.split(","):
        parse_setting(setting)  # refused before minutes of measuring, not after
    jpeg = photo_jpeg(args.width, args.height)
    print(background_load() + machine())
    backend = settings.from_environment()["BACKEND"]  # what the service will run
    predictor = one_thread_predictor(args.checkpoint, args.precision, backend)
    print(f"{Path(args.checkpoint).name}, {args.width}x{args.height} JPEG, {args.clients} clients, "
          f"{args.duration:.0f} s per setting")
    if args.url:
        before_ms = prediction_ms(predictor, jpeg)
        load(args.url, jpeg, args.clients, args.warmup)
        result = load(args.url, jpeg, args.clients, args.duration, args.bad_every)
        capacity = report_capacity(predictor, before_ms, prediction_ms(predictor, jpeg))
        report("--url", result, capacity, None)
        best = result.requests_per_second / capacity
    else:
        with tempfile.TemporaryDirectory() as folder:
            best = max(run_setting(setting, args, jpeg, predictor, Path(folder))
                       for setting in args.settings.split(","))
    print(f"ratio: {best:.2f}")


if __name__ == "__main__":
    main()
