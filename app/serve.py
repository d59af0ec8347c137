"""The service as `make run` and the Docker image start it: nginx in front, gunicorn behind.

    python app/serve.py        # SEG_BIND (127.0.0.1:8000) and every other SEG_* of README "Serving"

gunicorn's threaded workers give a connection a request thread from its first byte to its last,
so four clients that send slowly would hold all four threads.  nginx reads every request whole
(headers within SEG_CLIENT_TIMEOUT_S, a body with no pause longer than that, at most SEG_MAX_BYTES,
at most SEG_CONNECTIONS_PER_CLIENT connections per address) before gunicorn sees it, on a unix
socket in a private folder that only nginx can reach.  One process to start and to stop:
SIGTERM or SIGINT stops both, SIGHUP reloads the model (new workers load the file at
SEG_CHECKPOINT; once they have, the old ones finish their requests and go), and if either one
dies the other is stopped too.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "app" / "nginx.conf.template"
# What nginx may be told to listen on: host:port, [v6]:port or unix:/path; nothing that could end
# the directive (";", "{", spaces) and so inject configuration.
BIND = re.compile(r"(unix:/[\w./-]+|[\w.-]*:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})")
# The template's own markers, @@name@@: nginx's configuration is full of braces and $variables.
MARKER = re.compile(r"@@(\w+)@@")
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class FrontSettings:
    bind: str
    client_timeout_s: int
    max_bytes: int
    connections_per_client: int
    upstream_timeout_s: int
    workers: int


def whole_number(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or int(raw) < minimum:
        raise SystemExit(f"error: {name}={raw!r} is not a whole number of at least {minimum}")
    return int(raw)


def front_settings() -> FrontSettings:
    """The front's settings from the environment, each checked (bad input: one line, exit)."""
    bind = os.environ.get("SEG_BIND") or "127.0.0.1:8000"
    if not BIND.fullmatch(bind):
        raise SystemExit(f"error: SEG_BIND={bind!r} is not host:port, [ipv6]:port or unix:/path")
    return FrontSettings(bind=bind, client_timeout_s=whole_number("SEG_CLIENT_TIMEOUT_S", 10),
                         max_bytes=whole_number("SEG_MAX_BYTES", 20 * 1024 * 1024),
                         connections_per_client=whole_number("SEG_CONNECTIONS_PER_CLIENT", 64),
                         # gunicorn kills a worker stuck past SEG_TIMEOUT: nginx waits a little longer.
                         upstream_timeout_s=whole_number("SEG_TIMEOUT", 120) + 10,
                         workers=whole_number("SEG_WORKERS", 2))


def nginx_config(settings: FrontSettings, folder: Path) -> str:
    """nginx.conf for ``settings``, its pid, temporary files and gunicorn's socket in ``folder``."""
    # As root, nginx would run its workers as "nobody", who cannot enter the private folder: they
    # run as the user who started the service, as gunicorn does.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    values = {"user": user, "folder": str(folder), "bind": settings.bind, "socket": str(folder / "gunicorn.sock"),
              "client_timeout_s": settings.client_timeout_s, "max_bytes": settings.max_bytes,
              "connections_per_client": settings.connections_per_client,
              "upstream_timeout_s": settings.upstream_timeout_s}
    return MARKER.sub(lambda match: str(values[match.group(1)]), TEMPLATE.read_text())


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def die_with_parent() -> None:
    """In the child before exec: if this launcher is killed outright, its children are told to stop
    (Linux's parent-death signal), so no nginx or gunicorn is left behind holding the port."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def nginx_binary() -> str:
    found = os.environ.get("SEG_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).is_file():
        raise SystemExit("error: nginx is not installed (apt-get install nginx; or set SEG_NGINX to its path)")
    return found


def start_gunicorn(folder: Path, settings: FrontSettings) -> subprocess.Popen:
    (folder / "ready").mkdir()
    environment = dict(os.environ, SEG_BIND=f"unix:{folder / 'gunicorn.sock'}", SEG_PUBLIC_BIND=settings.bind,
                       SEG_BEHIND_FRONT="1", SEG_MAX_BYTES=str(settings.max_bytes),
                       SEG_READY_DIR=str(folder / "ready"), SEG_WORKERS=str(settings.workers))
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "app" / "gunicorn.conf.py"),
                             "app:create_app()"], cwd=ROOT, env=environment, preexec_fn=die_with_parent)


def wait_for_socket(socket: Path, gunicorn: subprocess.Popen, seconds: float = 60) -> None:
    """gunicorn binds before its workers load the model; nginx starts once there is a socket to pass
    requests to (until a worker is ready, /readyz waits in the socket's queue)."""
    deadline = time.monotonic() + seconds
    while not socket.exists():
        if gunicorn.poll() is not None:
            raise SystemExit(gunicorn.returncode or 1)
        if time.monotonic() > deadline:
            raise SystemExit(f"error: gunicorn did not bind {socket} within {seconds:.0f} s")
        time.sleep(0.05)


def start_nginx(folder: Path) -> subprocess.Popen:
    config = folder / "nginx.conf"
    # -e: the error log from the start, before nginx reads its configuration (its default path is
    # under /var/log, which a non-root user cannot open).  Its stdout is a pipe of this process,
    # copied to ours: nginx opens /dev/stdout for its access log, which a non-root user may not
    # open again when it is the container's or the terminal's (owned by root), but may a pipe of its own.
    nginx = subprocess.Popen([nginx_binary(), "-e", "stderr", "-p", str(folder), "-c", str(config),
                              "-g", "daemon off;"], stdout=subprocess.PIPE, preexec_fn=die_with_parent)
    threading.Thread(target=copy_lines, args=(nginx.stdout, sys.stdout.buffer), daemon=True).start()
    return nginx


def copy_lines(source: BinaryIO, target: BinaryIO) -> None:
    """Line by line, flushed, so that the access log shows each request as it is answered."""
    for line in iter(source.readline, b""):
        try:
            target.write(line)
            target.flush()
        except (OSError, ValueError):  # our stdout is gone: read on all the same, or nginx would block
            continue


def stop(process: subprocess.Popen, seconds: float = 40) -> None:
    """SIGTERM, then SIGKILL after ``seconds`` (gunicorn's graceful_timeout is 30 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Supervisor:
    """Runs until a signal says stop or one of the two processes exits; SIGHUP reloads the model.

    The reload rolls: gunicorn is asked for as many new workers again (TTIN), which load the file at
    SEG_CHECKPOINT, and only once each has loaded it (app/gunicorn.conf.py leaves a file per ready
    worker in ``ready``) are the old ones retired (TTOU stops the oldest), after their requests.
    gunicorn's own HUP stops the old workers at once, so nobody would serve while the new ones load.
    """

    def __init__(self, gunicorn: subprocess.Popen, nginx: subprocess.Popen, ready: Path, workers: int,
                 reload_timeout_s: float) -> None:
        self.gunicorn, self.nginx, self.ready, self.workers = gunicorn, nginx, ready, workers
        self.reload_timeout_s = reload_timeout_s
        self.stopping: list[int] = []
        self.reloads: list[int] = []
        signal.signal(signal.SIGHUP, lambda number, _: self.reloads.append(number))
        for name in (signal.SIGTERM, signal.SIGINT):
            signal.signal(name, lambda number, _: self.stopping.append(number))

    def running(self) -> bool:
        return not self.stopping and self.gunicorn.poll() is None and self.nginx.poll() is None

    def ready_workers(self) -> set[str]:
        return {path.name for path in self.ready.iterdir()}

    def signal_until(self, number: int, done: Callable[[], bool], seconds: float) -> bool:
        """Send gunicorn ``number`` and wait until ``done()``: one at a time, because signals of one
        kind that arrive together count as one."""
        self.gunicorn.send_signal(number)
        deadline = time.monotonic() + seconds
        while self.running() and not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def reload(self) -> None:
        old = children(self.gunicorn.pid)
        log(f"reloading: {self.workers} new workers load {os.environ.get('SEG_CHECKPOINT') or 'the default model'}")
        for count in range(1, self.workers + 1):
            self.signal_until(signal.SIGTTIN, lambda n=count: len(children(self.gunicorn.pid) - old) >= n, 10)
        deadline = time.monotonic() + self.reload_timeout_s
        while self.running() and len(self.ready_workers() - {str(pid) for pid in old}) < self.workers:
            if time.monotonic() > deadline:
                log(f"reload: the new workers were not ready within {self.reload_timeout_s:.0f} s; "
                    "retiring the old ones anyway")
                break
            time.sleep(0.2)
        for count in range(len(old) - 1, -1, -1):  # TTOU retires the oldest worker, after its requests
            self.signal_until(signal.SIGTTOU, lambda n=count: len(children(self.gunicorn.pid) & old) <= n, 40)
        log("reloaded: the new workers serve alone")

    def run(self) -> int:
        """Returns the exit code: 0 when told to stop, else that of the process that died."""
        while self.running():
            if self.reloads:
                self.reloads.clear()
                self.reload()
            time.sleep(0.2)
        died = None if self.stopping else ("gunicorn", self.gunicorn) if self.gunicorn.poll() is not None \
            else ("nginx", self.nginx)
        for process in (self.nginx, self.gunicorn):  # the front first: no new request reaches a stopping gunicorn
            stop(process)
        if died is None:
            return 0
        name, process = died
        log(f"{name} exited ({process.returncode}); stopped the other")
        return process.returncode or 1


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (field 4 of /proc/<pid>/stat): gunicorn's workers."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def log(message: str) -> None:
    print(f"serve.py: {message}", file=sys.stderr, flush=True)


def main() -> int:
    settings = front_settings()
    nginx_binary()  # before anything starts: a missing nginx is one line, not a half-started service
    folder = Path(tempfile.mkdtemp(prefix="seg-serve-"))  # mode 0700: only this user reaches the socket
    try:
        write_atomically(folder / "nginx.conf", nginx_config(settings, folder))
        gunicorn = start_gunicorn(folder, settings)
        try:
            wait_for_socket(folder / "gunicorn.sock", gunicorn)
            nginx = start_nginx(folder)
        except BaseException:
            stop(gunicorn)
            raise
        log(f"nginx on {settings.bind} in front of gunicorn (pid {gunicorn.pid}); kill -HUP {os.getpid()} "
            "reloads the model")
        return Supervisor(gunicorn, nginx, folder / "ready", settings.workers, 2 * settings.upstream_timeout_s).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
