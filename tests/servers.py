"""Real servers for tests, on a free loopback port: the service as `make run` starts it (serve.py:
nginx in front of gunicorn), or gunicorn alone."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT
from tests.tiny_checkpoint import make_checkpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read() if process.stderr else ''}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or workers still starting
            pass
        time.sleep(0.25)
    raise AssertionError("server did not become ready")


def environment(folder: Path, port: int, **settings: str) -> dict[str, str]:
    """Two workers of one torch thread serving a tiny checkpoint in ``folder`` (``settings``: more SEG_*)."""
    if "SEG_CHECKPOINT" not in settings:
        settings["SEG_CHECKPOINT"] = str(make_checkpoint(folder / "tiny.pth", varied=True))
    return dict(os.environ, SEG_RESULTS_DIR=str(folder / "results"), SEG_BIND=f"127.0.0.1:{port}",
                SEG_WORKERS="2", SEG_THREADS="1", **settings)


@contextlib.contextmanager
def gunicorn(folder: Path, **settings: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """gunicorn alone with 2 workers serving a tiny checkpoint in ``folder``; yields its base URL and
    the process, whose stderr is a pipe."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
                               cwd=ROOT, env=environment(folder, port, **settings), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


class Front:
    """serve.py running: its URL, its process and every line it has printed so far (nginx's access log,
    gunicorn's and nginx's error logs, in one stream)."""

    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url = url
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def lines_with(self, *words: str, seconds: float = 10) -> list[str]:
        """The lines holding every one of ``words``, waiting up to ``seconds`` for one (logs lag a little)."""
        deadline = time.monotonic() + seconds
        while True:
            found = [line for line in list(self.lines) if all(word in line for word in words)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def nginx_or_skip() -> None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").is_file()):
        pytest.skip("no nginx on this machine (.ci/run installs Debian's nginx)")


@contextlib.contextmanager
def front(folder: Path, **settings: str) -> Iterator[Front]:
    """The service as `make run` starts it (serve.py), 2 workers on a tiny checkpoint in ``folder``."""
    nginx_or_skip()
    port = free_port()
    process = subprocess.Popen([sys.executable, "app/serve.py"], cwd=ROOT, env=environment(folder, port, **settings),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Front(f"http://127.0.0.1:{port}", process)
    try:
        wait_until_ready(server.url, process)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=60)


def jpeg(width: int, height: int, seed: int, smooth: bool = False) -> bytes:
    """Noise; ``smooth``: blurred blobs, in which the tiny model finds regions a person can see."""
    shape = (height // 10 + 2, width // 10 + 2, 3) if smooth else (height, width, 3)
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BICUBIC).save(buffer, format="JPEG")
    return buffer.getvalue()
