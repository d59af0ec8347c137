"""gunicorn settings for the service: ``gunicorn -c app/gunicorn.conf.py "app:create_app()"``,
which serve.py (``make run``) starts behind nginx on a private unix socket.

Each worker builds its own app and loads the model after the fork (post_worker_init), so
the parent never touches torch or CUDA.  Tune with the environment:
SEG_BIND (127.0.0.1:8000: this machine only), SEG_WORKERS (2), SEG_THREADS_PER_WORKER (2 request threads),
SEG_THREADS (torch threads per worker; default: every core),
SEG_PRECISION (auto | fp32 | bf16 | int8), SEG_COMPILE (1: torch.compile at worker start),
SEG_DEVICE (cpu | cuda | cuda:i; default: worker i on GPU i mod n, see post_fork).
The defaults are the best setting measured by bench/serve.py (see bench/README.md).
"""
import gc
import ipaddress
import os
import shutil
import sys
import tempfile
from pathlib import Path

bind = os.environ.get("SEG_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SEG_WORKERS", "2"))
threads = int(os.environ.get("SEG_THREADS_PER_WORKER", "2"))
worker_class = "gthread"
timeout = int(os.environ.get("SEG_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
# Behind serve.py's front nginx writes the access log (it also sees what never reaches gunicorn:
# timeouts, refused uploads); one line per request is enough.
accesslog = None if os.environ.get("SEG_BEHIND_FRONT") == "1" else "-"
# gunicorn's default, plus the time taken and the request id the app answered with.
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms request_id=%({x-request-id}o)s'
errorlog = "-"
loglevel = os.environ.get("SEG_LOG_LEVEL", "info")
preload_app = False  # the model must load in each worker, after the fork


def on_starting(server) -> None:
    """In the master's environment before any worker forks, so each inherits it (a reload (HUP)
    keeps it): SEG_THREADS' default, and prometheus_client's multiprocess folder."""
    # Every worker may use every core: a lone request then has both for its forward (the default
    # model's service path 121.7-126.6 ms, against a one-thread prediction of 179-208 ms), and under
    # load 2 workers x 2 threads served as much as 2 x 1 (8.45 vs 8.37 req/s side by side with 4
    # clients); bench/README.md has both.  Here, not when the file is read: reading it (as the
    # tests do) leaves the reader's environment alone.
    os.environ.setdefault("SEG_THREADS", str(len(os.sched_getaffinity(0))))
    give_metrics_a_folder()


def give_metrics_a_folder() -> None:
    """prometheus_client's multiprocess mode (app/metrics.py) needs a folder where every worker
    writes its values.  A folder the operator named may hold a previous run's files, which would
    be counted again."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="seg-metrics-")
        os.environ["SEG_METRICS_FOLDER_MADE"] = "1"
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for stale in Path(folder).glob("*.db"):
        stale.unlink()


def on_exit(server) -> None:
    if os.environ.get("SEG_METRICS_FOLDER_MADE") == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server, worker) -> None:
    """A dead worker's gauges (requests in flight, the model it served) must stop counting, and
    serve.py must not count it as ready."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
    ready = os.environ.get("SEG_READY_DIR")
    if ready:
        (Path(ready) / str(worker.pid)).unlink(missing_ok=True)


def is_loopback_bind(bind: str) -> bool:
    """True for a gunicorn bind address that only this machine can reach (a unix socket too)."""
    if bind.startswith(("unix:", "fd://")):
        return True
    host = bind.rsplit(":", 1)[0] if not bind.startswith("[") else bind[1:bind.index("]")]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def when_ready(server) -> None:
    """Say so, loudly, when strangers on the network can use the service (or its page) without a token.
    Here, in the master, nothing of the app is imported: the master never loads torch."""
    # Behind serve.py's front gunicorn binds a private socket; the address clients reach is the front's.
    public = os.environ.get("SEG_PUBLIC_BIND")
    open_binds = [address for address in ([public] if public else server.cfg.bind) if not is_loopback_bind(address)]
    if not open_binds:
        return
    if not os.environ.get("SEG_API_TOKEN"):
        server.log.warning("listening on %s with no SEG_API_TOKEN: anyone who can reach this address can use the "
                           "service; set SEG_API_TOKEN, or bind 127.0.0.1 behind a proxy", ", ".join(open_binds))
    elif os.environ.get("SEG_PAGE_PUBLIC") == "1":
        server.log.warning("listening on %s with SEG_PAGE_PUBLIC=1: anyone who can reach this address can segment "
                           "images on the page without the token", ", ".join(open_binds))


def post_fork(server, worker) -> None:
    """Number the worker for app/settings.py's default device (GPU i mod n).  worker.age counts the
    workers the arbiter has started, from 1, so a restarted worker takes the next GPU in turn.
    No garbage collection until the app and the model are loaded (post_worker_init)."""
    gc.disable()
    os.environ["SEG_WORKER_INDEX"] = str(worker.age - 1)
    if worker.age > server.cfg.workers:
        from app.metrics import WORKER_RESTARTS
        WORKER_RESTARTS.inc()


def post_worker_init(worker) -> None:
    """Load the model, then let the garbage collector leave out what the start made: importing
    torch and the app leaves ~0.5 M objects that live as long as the worker, over which it ran
    full passes during the start and would again between requests."""
    from utils.garbage import freeze_survivors

    try:
        load_model_at_start(worker)
    finally:
        freeze_survivors()


def load_model_at_start(worker) -> None:
    """Load the model when the worker starts, not on its first request.

    A checkpoint that cannot be loaded stops the whole server with one clear line (exit code
    4 tells gunicorn's arbiter the app cannot load, so it does not restart workers forever).
    """
    from utils.checkpoint import CheckpointError

    app = worker.wsgi
    if not app.config.get("LOAD_MODEL_AT_START", True):
        return
    try:
        app.extensions["segmenter"].load()
    except CheckpointError as error:
        worker.log.error("cannot serve: %s (set SEG_CHECKPOINT to a checkpoint made by train.py)", error)
        sys.exit(4)
    worker.log.info("worker %s: model loaded from %s", worker.pid, app.config["CHECKPOINT"])
    ready = os.environ.get("SEG_READY_DIR")
    if ready:  # serve.py's rolling reload retires the old workers once the new ones are here
        (Path(ready) / str(worker.pid)).touch()
