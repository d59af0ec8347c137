"""The service's edge: security headers, trusted hosts, results behind the token (or a signature),
result storage bounded in bytes and safe on a full disk, and a loopback bind by default."""
from __future__ import annotations

import errno
import gc
import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app import settings
from app.results import SUFFIXES, WRITE_GRACE_S, ResultFiles, prune_results
from app.security import CONTENT_SECURITY_POLICY
from tests.conftest import ROOT
from tests.servers import free_port
from tests.test_app import encoded, local, photo, post_file

TOKEN = {"Authorization": "Bearer s3cret"}


def results_folder(client) -> Path:
    return Path(client.application.config["RESULTS_DIR"])


def assert_security_headers(response) -> None:
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_every_response_carries_the_security_headers(make_client):
    client = make_client()
    answer = post_file(client, encoded(photo()))
    responses = [client.get("/"), answer, client.get(local(answer.get_json()["mask_url"])),
                 post_file(client, b"text"), client.get("/nope"), client.get("/static/page.js"),
                 client.delete("/json"), post_file(make_client(MAX_CONTENT_LENGTH=10), encoded(photo())),
                 post_file(make_client(API_TOKEN="s3cret"), encoded(photo()))]
    assert [response.status_code for response in responses] == [200, 200, 200, 415, 404, 200, 405, 413, 401]
    for response in responses:
        assert_security_headers(response)


def test_the_page_needs_nothing_inline_that_the_policy_forbids(make_client):
    """The policy allows the page's own files only: no inline script, style or event handler."""
    html = post_file(make_client(), encoded(photo()), url="/").data.decode()
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    assert not re.search(r"<script(?![^>]*\ssrc=)", html)


def test_results_are_private_and_never_cached(make_client):
    client = make_client()
    body = post_file(client, encoded(photo())).get_json()
    for key in ("image_url", "mask_url", "json_url"):
        response = client.get(local(body[key]))
        assert response.status_code == 200 and response.headers["Cache-Control"] == "private, no-store"


def test_a_forged_host_is_refused_and_never_echoed(make_client):
    client = make_client()
    for url in ("/json", "/"):
        response = post_file(client, encoded(photo()), url=url, headers={"Host": "evil.example"})
        assert response.status_code == 400 and b"evil.example" not in response.data
        assert b"no host this service answers for" in response.data
        assert_security_headers(response)
    assert not results_folder(client).exists() or not list(results_folder(client).iterdir())
    assert post_file(client, encoded(photo()), headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_allowed_hosts_come_from_the_environment(monkeypatch):
    assert settings.from_environment()["TRUSTED_HOSTS"] == ["localhost", "127.0.0.1"]
    monkeypatch.setenv("SEG_ALLOWED_HOSTS", "seg.example.org, .example.net")
    assert settings.from_environment()["TRUSTED_HOSTS"] == ["seg.example.org", ".example.net"]


def test_results_need_the_token_or_the_signature_handed_out(make_client):
    client = make_client(API_TOKEN="s3cret")
    body = post_file(client, encoded(photo()), headers=TOKEN).get_json()
    signed = local(body["mask_url"])
    plain, query = signed.split("?")
    assert re.fullmatch(r"expires=\d+&sig=[0-9a-f]{64}", query)
    assert client.get(plain).status_code == 401
    assert client.get(plain, headers=TOKEN).status_code == 200
    assert client.get(signed).status_code == 200
    tampered = signed[:-1] + ("0" if signed[-1] != "0" else "1")
    assert client.get(tampered).status_code == 401
    other = local(body["image_url"]).split("?")[0] + "?" + query  # the mask's signature on the overlay
    assert client.get(other).status_code == 401
    later = re.sub(r"expires=\d+", f"expires={int(time.time()) + 10**6}", signed)  # a longer life, forged
    assert client.get(later).status_code == 401


@pytest.mark.parametrize("query", [
    "expires=%C2%B2&sig=" + "0" * 64,  # a digit to str.isdigit, not to int
    "expires=9999999999&sig=%C3%A9", "expires=9" * 5000 + "&sig=" + "0" * 64, "expires=&sig=", "sig=abc",
    "expires=-1&sig=" + "0" * 64,
], ids=["superscript-two", "non-ascii-sig", "huge", "empty", "no-expiry", "negative"])
def test_malformed_signatures_are_401s_never_500s(make_client, query):
    client = make_client(API_TOKEN="s3cret")
    name = local(post_file(client, encoded(photo()), headers=TOKEN).get_json()["mask_url"]).split("?")[0]
    assert client.get(f"{name}?{query}").status_code == 401


def test_signatures_expire(make_client):
    client = make_client(API_TOKEN="s3cret", RESULT_URL_TTL_S=-1)
    body = post_file(client, encoded(photo()), headers=TOKEN).get_json()
    assert client.get(local(body["mask_url"])).status_code == 401


def test_the_public_page_works_with_a_token_set(make_client):
    client = make_client(API_TOKEN="s3cret", PAGE_PUBLIC=True)
    html = post_file(client, encoded(photo()), url="/").data.decode()
    urls = re.findall(r'(?:src|href|data-mask-url)="(/results/[^"]+)"', html)
    assert len(urls) >= 5
    for url in urls:
        assert client.get(url.replace("&amp;", "&")).status_code == 200, url


def test_model_information_needs_the_token_and_loads_nothing_without_it(make_client):
    client = make_client(API_TOKEN="s3cret", LOAD_MODEL_AT_START=False)
    assert client.get("/api/model").status_code == 401
    assert client.get("/readyz").status_code == 503  # the anonymous request did not load the model
    assert client.get("/api/model", headers=TOKEN).status_code == 200


def result_sizes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in folder.iterdir():
        sizes[path.name[:22]] = sizes.get(path.name[:22], 0) + path.stat().st_size
    return sizes


def make_results(folder: Path, sizes: list[int]) -> list[str]:
    """Results of ``sizes`` bytes (a quarter in each file), oldest first, ten seconds apart."""
    made = []
    for age, size in zip(range(10 * len(sizes), 0, -10), sizes, strict=True):
        files = ResultFiles(folder)
        for kind in SUFFIXES:
            files.path(kind).parent.mkdir(exist_ok=True)
            files.path(kind).write_bytes(b"x" * (size // 4))
            os.utime(files.path(kind), (time.time() - age,) * 2)
        made.append(files.id)
    return made


def test_the_byte_budget_prunes_the_oldest_first_and_never_the_result_being_written(tmp_path):
    folder = tmp_path / "results"
    made = make_results(folder, [400] * 5)  # made[0] is the oldest
    # A budget of 1000 keeps the result being written (here the oldest) and the newest.
    assert prune_results(folder, keep=100, max_age_s=3600, max_bytes=1000, current=made[0]) == 3
    assert set(result_sizes(folder)) == {made[0], made[4]}
    assert prune_results(folder, keep=100, max_age_s=3600, max_bytes=10, current=made[4]) == 1
    assert set(result_sizes(folder)) == {made[4]}  # over the budget alone, but being written
    assert prune_results(folder, keep=0, max_age_s=-1, max_bytes=0, current=made[4]) == 0


def test_once_over_the_budget_every_older_result_goes_even_a_small_one(tmp_path):
    folder = tmp_path / "results"
    small, big, newest = make_results(folder, [40, 800, 400])
    assert prune_results(folder, keep=100, max_age_s=3600, max_bytes=1000) == 2
    assert set(result_sizes(folder)) == {newest}


def test_a_result_another_request_is_still_writing_is_spared_until_its_grace_ends(tmp_path):
    folder = tmp_path / "results"
    writing, _ = make_results(folder, [400, 400])  # the older of the two, still being written
    (folder / (writing + SUFFIXES["json"])).unlink()  # its JSON, written last, is not there yet
    assert prune_results(folder, keep=1, max_age_s=3600, max_bytes=10**6) == 1
    assert set(result_sizes(folder)) == {writing}
    for path in folder.iterdir():
        os.utime(path, (time.time() - WRITE_GRACE_S - 1,) * 2)  # a worker died while writing it
    assert prune_results(folder, keep=0, max_age_s=3600, max_bytes=10**6) == 1
    assert not list(folder.iterdir())


def test_temporary_files_a_killed_worker_left_are_removed_once_stale(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    fresh, stale, other = (folder / f".{'a' * 22}.png.1.2.tmp", folder / f".{'b' * 22}.jpg.3.4.tmp",
                           folder / ".notes.tmp")
    for path in (fresh, stale, other):
        path.write_bytes(b"x")
    os.utime(stale, (time.time() - WRITE_GRACE_S - 1,) * 2)
    os.utime(other, (time.time() - WRITE_GRACE_S - 1,) * 2)
    prune_results(folder, keep=10, max_age_s=3600, max_bytes=10**6)
    assert fresh.exists() and not stale.exists() and other.exists()


def test_the_service_keeps_its_results_within_the_byte_budget(make_client):
    # Smaller than any result, pruned after each: only the newest is kept.
    client = make_client(RESULTS_MAX_BYTES=1, RESULTS_PRUNE_INTERVAL_S=0)
    for _ in range(3):
        body = post_file(client, encoded(photo())).get_json()
        assert client.get(local(body["json_url"])).status_code == 200
        assert list(result_sizes(results_folder(client))) == [body["json_url"].rsplit("/", 1)[1][:22]]


def test_a_short_disk_is_a_507_before_anything_is_written(make_client, monkeypatch):
    client = make_client()
    post_file(client, encoded(photo()))
    before = sorted(results_folder(client).iterdir())
    free = []
    monkeypatch.setattr("app.results.free_bytes", lambda folder: free.append(folder) or 1000)
    response = post_file(client, encoded(photo()))
    assert response.status_code == 507 and free
    assert response.get_json()["error"].startswith("the server's disk is too full to store this result")
    assert sorted(results_folder(client).iterdir()) == before


def test_a_disk_that_fills_during_the_write_leaves_no_part_of_the_result(make_client, monkeypatch, caplog):
    client = make_client()

    def full(self, class_map):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResultFiles, "save_mask", full)  # after the overlay was written
    with caplog.at_level(logging.ERROR):
        response = post_file(client, encoded(photo()), url="/")
    assert response.status_code == 507 and "disk is full" in response.data.decode()
    assert not list(results_folder(client).iterdir())  # neither the overlay nor a temporary file
    assert "results not stored" in caplog.text


@pytest.mark.parametrize("bind,loopback", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True), ("unix:/run/seg.sock", True),
    ("0.0.0.0:8000", False), ("[::]:8000", False), ("192.168.1.4:80", False), ("seg.example.org:80", False),
    (":8000", False),
])
def test_loopback_binds_are_told_apart(monkeypatch, bind, loopback):
    assert gunicorn_settings(monkeypatch).is_loopback_bind(bind) is loopback


def gunicorn_settings(monkeypatch, **environment):
    for name in ("SEG_BIND", "SEG_API_TOKEN", "SEG_PAGE_PUBLIC", "SEG_PUBLIC_BIND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "app" / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warnings_at_start(module, binds: list[str]) -> list[str]:
    said = []
    log = SimpleNamespace(warning=lambda message, *args: said.append(message % args))
    module.when_ready(SimpleNamespace(cfg=SimpleNamespace(bind=binds), log=log))
    return said


def test_gunicorn_binds_loopback_unless_told_and_warns_when_open_without_a_token(monkeypatch):
    module = gunicorn_settings(monkeypatch)
    assert module.bind == "127.0.0.1:8000"
    assert warnings_at_start(module, [module.bind]) == []
    assert "with no SEG_API_TOKEN" in warnings_at_start(module, ["0.0.0.0:8000"])[0]
    assert gunicorn_settings(monkeypatch, SEG_BIND="0.0.0.0:9000").bind == "0.0.0.0:9000"
    assert warnings_at_start(gunicorn_settings(monkeypatch, SEG_API_TOKEN="s3cret"), ["0.0.0.0:8000"]) == []
    public = gunicorn_settings(monkeypatch, SEG_API_TOKEN="s3cret", SEG_PAGE_PUBLIC="1")
    assert "with SEG_PAGE_PUBLIC=1" in warnings_at_start(public, ["0.0.0.0:8000"])[0]
    assert warnings_at_start(public, ["127.0.0.1:8000"]) == []


def test_behind_the_front_the_warning_is_about_the_front_s_address(monkeypatch):
    socket = ["unix:/tmp/seg-serve-x/gunicorn.sock"]
    assert warnings_at_start(gunicorn_settings(monkeypatch, SEG_PUBLIC_BIND="127.0.0.1:8000"), socket) == []
    warned = warnings_at_start(gunicorn_settings(monkeypatch, SEG_PUBLIC_BIND="0.0.0.0:8000"), socket)
    assert "listening on 0.0.0.0:8000 with no SEG_API_TOKEN" in warned[0]


def starting_worker(monkeypatch, module, load) -> SimpleNamespace:
    """A worker through post_fork, its app's model loaded by ``load``."""
    monkeypatch.setenv("SEG_WORKER_INDEX", "")  # post_fork sets it: put back after the test
    app = SimpleNamespace(config={"CHECKPOINT": "model.pth"}, extensions={"segmenter": SimpleNamespace(load=load)})
    worker = SimpleNamespace(age=1, pid=1, wsgi=app, log=SimpleNamespace(error=print, info=print))
    module.post_fork(SimpleNamespace(cfg=SimpleNamespace(workers=2)), worker)
    return worker


def test_a_worker_starts_without_garbage_collection_then_freezes_what_it_made(monkeypatch):
    module = gunicorn_settings(monkeypatch)
    frozen = gc.get_freeze_count()
    try:
        worker = starting_worker(monkeypatch, module, load=lambda: None)
        assert not gc.isenabled()  # importing torch and the app: no passes over what they make
        made = [[] for _ in range(1000)]  # what the start made, alive after it
        module.post_worker_init(worker)
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.enable()


def test_a_worker_that_cannot_load_its_model_exits_with_garbage_collection_on(monkeypatch):
    from utils.checkpoint import CheckpointError

    def load():
        raise CheckpointError("not a checkpoint")

    module = gunicorn_settings(monkeypatch)
    try:
        worker = starting_worker(monkeypatch, module, load)
        with pytest.raises(SystemExit) as exit_code:
            module.post_worker_init(worker)
        assert exit_code.value.code == 4 and gc.isenabled()
    finally:
        gc.enable()


def test_a_real_gunicorn_on_every_interface_says_so_in_its_log(tiny_checkpoint, tmp_path):
    environment = dict(os.environ, SEG_CHECKPOINT=str(tiny_checkpoint), SEG_RESULTS_DIR=str(tmp_path / "results"),
                       SEG_BIND=f"0.0.0.0:{free_port()}", SEG_WORKERS="1", SEG_LOAD_MODEL_AT_START="0",
                       # Killed outright below, gunicorn cannot remove a metrics folder it made itself.
                       PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    environment.pop("SEG_API_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
                               cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    lines: list[str] = []
    try:  # the master says it when ready, before it starts a worker
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Booting worker" in line for line in lines):
            lines.append(process.stderr.readline())
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # master and worker: nothing of this server is needed any more
        process.wait(timeout=30)
    assert any("with no SEG_API_TOKEN: anyone who can reach this address" in line for line in lines), lines


def test_gunicorn_gives_every_worker_every_core_when_it_starts_unless_told(monkeypatch, tmp_path):
    monkeypatch.setenv("SEG_THREADS", "")
    monkeypatch.delenv("SEG_THREADS")  # absent, and put back as it was after the test
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    hooks = gunicorn_settings(monkeypatch)
    # Reading the file changes nothing: a test process that did ran every later app on every core.
    assert "SEG_THREADS" not in os.environ
    hooks.on_starting(None)
    assert os.environ["SEG_THREADS"] == str(len(os.sched_getaffinity(0)))
    monkeypatch.setenv("SEG_THREADS", "3")
    hooks.on_starting(None)
    assert os.environ["SEG_THREADS"] == "3"


def test_gunicorn_gives_the_metrics_a_fresh_folder_and_removes_the_one_it_made(monkeypatch, tmp_path):
    for name in ("PROMETHEUS_MULTIPROC_DIR", "SEG_METRICS_FOLDER_MADE", "SEG_THREADS"):
        monkeypatch.setenv(name, "")  # empty is unset; whatever the hooks set is undone after the test
    hooks = gunicorn_settings(monkeypatch)
    hooks.on_starting(None)
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir() and not list(made.iterdir())
    hooks.on_exit(None)
    assert not made.exists()
    named = tmp_path / "metrics"
    named.mkdir()
    (named / "counter_123.db").write_bytes(b"a previous run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(named))
    monkeypatch.setenv("SEG_METRICS_FOLDER_MADE", "")
    hooks.on_starting(None)
    hooks.on_exit(None)
    assert named.is_dir() and not list(named.iterdir())  # emptied of stale values, and kept
