"""The real server as `make run` starts it (serve.py: nginx in front of gunicorn, 2 workers x 2
request threads): slow clients cannot starve it, oversized uploads are refused unread, request ids
reach the log, /metrics counts every worker, and a HUP reload serves a new checkpoint with no
failed request."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app import serve
from tests.servers import Front, front, jpeg, nginx_or_skip
from tests.tiny_checkpoint import make_checkpoint
from utils.fileio import file_sha256

TIMEOUT_S = 3  # SEG_CLIENT_TIMEOUT_S of these servers
REQUEST_THREADS = 4  # 2 workers x 2 threads


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The checkpoint the module's server serves, at the path a HUP reload reads again."""
    return make_checkpoint(tmp_path_factory.mktemp("served") / "served.pth", varied=True)


@pytest.fixture(scope="module")
def server(served, tmp_path_factory) -> Front:
    """One server for the whole file, the HUP reload test last: each start costs a serve.py, an
    nginx and two workers that import torch (5 s of CPU, AMD EPYC avx512_bf16).  Once it has
    stopped, serve.py's private folder must be gone with it."""
    with front(tmp_path_factory.mktemp("front"), SEG_CHECKPOINT=str(served), SEG_THREADS_PER_WORKER="2",
               SEG_CLIENT_TIMEOUT_S=str(TIMEOUT_S), SEG_MAX_BYTES="200000") as running:
        yield running
        socket_path = re.search(r"Listening at: unix:(\S+)", "".join(running.lines)).group(1)
    assert not Path(socket_path).parent.exists()  # serve.py's private folder goes with it


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "0.0.0.0:80", "[::1]:8000", "localhost:9000", "unix:/run/s.sock"])
def test_the_rendered_nginx_configuration_is_valid(bind, tmp_path, monkeypatch):
    nginx_or_skip()
    monkeypatch.setenv("SEG_BIND", bind)
    monkeypatch.setenv("SEG_MAX_BYTES", "12345")
    text = serve.nginx_config(serve.front_settings(), tmp_path)
    assert "@@" not in text and f"listen {bind};" in text and "client_max_body_size 12345;" in text
    (tmp_path / "nginx.conf").write_text(text.replace(f"listen {bind};", "listen 127.0.0.1:1;"))  # -t binds nothing
    checked = subprocess.run([serve.nginx_binary(), "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c",
                              str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("name,value", [("SEG_BIND", "127.0.0.1:80; include /etc/x"), ("SEG_BIND", "0.0.0.0"),
                                        ("SEG_CLIENT_TIMEOUT_S", "ten"), ("SEG_CONNECTIONS_PER_CLIENT", "0"),
                                        ("SEG_MAX_BYTES", "-1")])
def test_bad_front_settings_are_one_line_errors(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"error: {name}="):
        serve.front_settings()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def trickle(url: str, sent: bytes, trickled: bytes, stop: threading.Event, closed_after: list[float]) -> None:
    """Send ``sent``, then ``trickled`` a byte at a time 0.5 s apart, until the server closes the
    connection (the time it took appended to ``closed_after``) or ``stop`` is set."""
    started = time.monotonic()
    with connect(url) as connection:
        try:
            connection.sendall(sent)
            for byte in trickled:
                connection.sendall(bytes([byte]))
                if stop.wait(0.5):
                    return
        except OSError:  # reset or broken pipe: the server closed it
            closed_after.append(time.monotonic() - started)


def post_photo(url: str, seed: int, **headers: str) -> requests.Response:
    return requests.post(url + "/json", files={"file": ("p.jpg", jpeg(64, 48, seed))}, headers=headers, timeout=10)


def test_more_slow_clients_than_request_threads_starve_nobody(server):
    head = b"POST /json HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 4000\r\n\r\n"
    stop, closed_after = threading.Event(), []
    # As many trickling their headers as there are request threads, and as many their bodies.
    slow = [threading.Thread(target=trickle, args=(server.url, sent, trickled, stop, closed_after))
            for sent, trickled in [(b"", head)] * REQUEST_THREADS + [(head, b"\xff" * 4000)] * REQUEST_THREADS]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1)  # every slow connection open and sending before the normal client comes
        answers = [post_photo(server.url, seed) for seed in range(4)]
        assert [answer.status_code for answer in answers] == [200] * 4
        # The headers take longer than the timeout: those connections are closed once it has passed (a
        # body that keeps coming, however slowly, is nginx's to hold: it costs no request thread).
        deadline = time.monotonic() + TIMEOUT_S + 10
        while len(closed_after) < REQUEST_THREADS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(closed_after) == REQUEST_THREADS and all(TIMEOUT_S - 0.5 < t < TIMEOUT_S + 5 for t in closed_after)
    finally:
        stop.set()
        for thread in slow:
            thread.join(timeout=30)
    timed_out = [line for line in server.lines_with('" 408 ') if line.startswith("127.0.0.1 ")]
    assert len(timed_out) >= REQUEST_THREADS  # each logged with the client's address


def test_an_upload_over_the_limit_is_refused_before_it_is_read(server):
    with connect(server.url) as connection:
        connection.sendall(b"POST /json HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 5000000\r\nX-Request-ID: big-1\r\n\r\n")  # and not one byte of body
        answer = connection.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413") and "X-Request-ID: big-1" in answer
    assert '"error": "upload too large: the limit is 200000 bytes", "request_id": "big-1"' in answer


def test_request_ids_given_or_made_are_answered_and_logged(server):
    given = post_photo(server.url, 1, **{"X-Request-ID": "user-report-1"})
    assert given.status_code == 200 and given.headers["X-Request-ID"] == "user-report-1"
    assert server.lines_with('"POST /json HTTP/1.1" 200', "request_id=user-report-1")
    for sent in ({}, {"X-Request-ID": "not valid!" + "x" * 80}):
        made = post_photo(server.url, 2, **sent).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", made) and server.lines_with('"POST /json HTTP/1.1" 200', made)
    refused = requests.post(server.url + "/json", data=b"not an image", headers={"X-Request-ID": "bad-1"}, timeout=10)
    assert refused.status_code == 415 and refused.json()["request_id"] == "bad-1"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def answered(found: dict, status: str) -> float:
    return found.get(("seg_http_requests_total", (("method", "POST"), ("route", "/json"), ("status", status))), 0)


def latency_count(found: dict) -> float:
    return found.get(("seg_http_request_duration_seconds_count", (("route", "/json"),)), 0)


def live_workers(found: dict) -> dict[str, str]:
    """pid -> sha256 of the model each live worker serves (seg_model_info)."""
    return {dict(labels)["pid"]: dict(labels)["sha256"] for name, labels in found if name == "seg_model_info"}


def test_metrics_add_up_every_worker(server):
    before = scrape(server.url)
    assert len(live_workers(before)) == 2
    with ThreadPoolExecutor(4) as pool:  # at once, so that both workers answer some
        assert [r.status_code for r in pool.map(lambda seed: post_photo(server.url, seed), range(12))] == [200] * 12
    for _ in range(6):  # whichever worker answers the scrape, it reports both
        after = scrape(server.url)
        assert answered(after, "200") - answered(before, "200") == 12
        assert latency_count(after) - latency_count(before) == 12


def test_hup_reload_serves_the_new_checkpoint_without_a_failed_request(server, served, tmp_path):
    """Last in the file: after it, the module's server serves another checkpoint."""
    new = make_checkpoint(tmp_path / "new.pth", base_width=8, varied=True)
    old_sha = requests.get(server.url + "/api/model", timeout=10).json()["checkpoint_sha256"]
    before = scrape(server.url)
    old_workers = set(live_workers(before))
    stop, statuses = threading.Event(), []

    def load(seed: int) -> None:
        # A request every ~50 ms from each client spans the switch-over densely; back-to-back
        # requests would only slow the new workers' start with CPU they do not need.
        while not stop.wait(0.05):
            try:
                statuses.append(post_photo(server.url, seed).status_code)
            except requests.RequestException as error:
                statuses.append(repr(error))

    clients = [threading.Thread(target=load, args=(seed,)) for seed in range(2)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        os.replace(new, served)  # the operator's step: the new file at the served path, atomically
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while set(live_workers(scrape(server.url)).values()) != {file_sha256(served)}:
            assert time.monotonic() < deadline, "the new workers did not take over"
            time.sleep(0.5)
        answered_before = len(statuses)
        time.sleep(1)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
    assert len(statuses) > answered_before and set(statuses) == {200}, statuses
    described = requests.get(server.url + "/api/model", timeout=10).json()
    assert described["checkpoint_sha256"] == file_sha256(served) != old_sha
    after = scrape(server.url)
    restarts = [metrics.get(("seg_worker_restarts_total", ()), 0) for metrics in (before, after)]
    assert restarts[1] - restarts[0] == 2  # counted on the file's server: the reload's own restarts
    # The old workers stopped only once both new ones had loaded the model: none was without a worker.
    log = "".join(server.lines)
    loaded = [log.index(f"worker {pid}: model loaded") for pid in live_workers(after)]
    exiting = [log.index(f"Worker exiting (pid: {pid})") for pid in old_workers]
    assert len(loaded) == 2 and max(loaded) < min(exiting)
