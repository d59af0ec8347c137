"""The service for real: gunicorn on a loopback port under concurrent clients, and a browser."""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """gunicorn with 2 workers serving the tiny checkpoint; yields its base URL."""
    folder = tmp_path_factory.mktemp("served")
    port = free_port()
    environment = dict(os.environ, SEG_CHECKPOINT=str(make_checkpoint(folder / "tiny.pth")),
                       SEG_RESULTS_DIR=str(folder / "results"), SEG_BIND=f"127.0.0.1:{port}",
                       SEG_WORKERS="2", SEG_THREADS_PER_WORKER="2", SEG_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
                               cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_gunicorn_answers_concurrent_clients_correctly(served):
    def one(n: int) -> tuple[int, int, int]:
        width, height = 60 + n, 40 + 2 * n
        response = requests.post(served + "/json", files={"file": ("p.jpg", jpeg(width, height, n))}, timeout=60)
        body = response.json()
        image = requests.get(body["image_url"], timeout=30)
        assert Image.open(io.BytesIO(image.content)).size == (width, height)
        return response.status_code, sum(c["area"] for c in body["classes"]), width * height

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, range(24)))
    assert time.monotonic() - started < 120
    assert all(status == 200 for status, _, _ in answers)
    assert all(area == expected for _, area, expected in answers)
    bad = requests.post(served + "/json", data=b"not an image", timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no Chromium + chromedriver on this machine (.ci/run installs Debian's chromium-driver)")
    return browser, driver


def test_browser_uploads_and_sees_the_result(served, tmp_path):
    browser, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(120, 80, 7))
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(served + "/")
        driver.find_element(By.NAME, "file").send_keys(str(photo))
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        found = expected_conditions.presence_of_element_located((By.ID, "result-image"))
        image = WebDriverWait(driver, 60).until(found)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image))
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 120
        assert driver.find_elements(By.CSS_SELECTOR, "#legend tr")
        driver.save_screenshot(str(Path(tmp_path) / "page.png"))
    finally:
        driver.quit()
