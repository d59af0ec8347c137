"""The service for real, as `make run` starts it (nginx in front of gunicorn) on a loopback port:
under concurrent clients, and in a browser (headless Chromium: the enhanced page, and the plain
form without JavaScript).

The browser tests save screenshots in save/screenshots/ (ignored by git) to look at."""
from __future__ import annotations

import base64
import io
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT
from tests.servers import front, jpeg


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The service as `make run` starts it (nginx in front of gunicorn), 2 workers x 2 threads on
    the tiny checkpoint; yields its base URL."""
    with front(tmp_path_factory.mktemp("served"), SEG_THREADS_PER_WORKER="2") as server:
        yield server.url


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
    assert bad.status_code == 415 and "error" in bad.json()


SCREENSHOTS = ROOT / "save" / "screenshots"


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no Chromium + chromedriver on this machine (.ci/run installs Debian's chromium-driver)")
    return browser, driver


@pytest.fixture()
def chrome(tmp_path):
    """``chrome(javascript=True)``: a headless Chromium at desktop size; all are closed after the test."""
    browser, driver_path = chromium_paths()
    from selenium import webdriver

    drivers = []

    def start(javascript: bool = True):
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1200,1000", f"--user-data-dir={tmp_path / str(len(drivers))}"):
            options.add_argument(flag)
        if not javascript:
            options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
        drivers.append(webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options))
        return drivers[-1]

    yield start
    for driver in drivers:
        driver.quit()


def screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / name))


def wait_for(driver, condition, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds).until(condition)


def canvas_data(driver) -> str:
    return driver.execute_script("return document.getElementById('result-canvas').toDataURL()")


def enhanced_result(driver, previous=None):
    """The result canvas the page's script draws, once it is there (and ``previous`` is gone)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    if previous is not None:
        wait_for(driver, staleness_of(previous))
    return wait_for(driver, lambda d: (d.find_elements(By.ID, "result-canvas") or [None])[0])


def hex_rgb(colour: str) -> list[int]:
    return list(bytes.fromhex(colour.removeprefix("#")))


def pixel(driver, element_id: str, x: int, y: int) -> list[int]:
    """The RGB of image pixel (x, y) of the image or canvas ``element_id``, as the browser decoded it."""
    return driver.execute_script("""const source = document.getElementById(arguments[0]);
        const canvas = Object.assign(document.createElement('canvas'), {width: source.width, height: source.height});
        if (source instanceof HTMLImageElement) {
            Object.assign(canvas, {width: source.naturalWidth, height: source.naturalHeight});
        }
        const context = canvas.getContext('2d');
        context.drawImage(source, 0, 0);
        return Array.from(context.getImageData(arguments[1], arguments[2], 1, 1).data.slice(0, 3));""",
                                 element_id, x, y)


def interior_pixel(class_ids: np.ndarray, class_id: int, margin: int = 1) -> tuple[int, int]:
    """(x, y) of a pixel of ``class_id`` whose neighbours within ``margin`` all share its class."""
    height, width = class_ids.shape
    for y in range(margin, height - margin):
        for x in range(margin, width - margin):
            if (class_ids[y - margin:y + margin + 1, x - margin:x + margin + 1] == class_id).all():
                return x, y
    raise AssertionError(f"no interior pixel of class {class_id}")


def point_at(driver, element, x: int, y: int, width: int, height: int) -> None:
    """Move the mouse over image pixel (x, y) of ``element``, which shows a ``width`` x ``height`` image."""
    from selenium.webdriver.common.action_chains import ActionChains
    shown_width, shown_height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", element)
    dx = (x + 0.5) * shown_width / width - shown_width / 2  # selenium offsets from the element's centre
    dy = (y + 0.5) * shown_height / height - shown_height / 2
    ActionChains(driver).move_to_element_with_offset(element, round(dx), round(dy)).perform()


def test_browser_page_compares_highlights_names_and_downloads(served, chrome, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(120, 80, 7, smooth=True))
    driver = chrome()
    driver.get(served + "/")
    driver.execute_script("""window.busySeen = false;
        new MutationObserver(() => { window.busySeen ||= !document.getElementById('busy').hidden; })
            .observe(document.getElementById('busy'), {attributes: true});""")
    driver.find_element(By.NAME, "file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    canvas = enhanced_result(driver)
    assert driver.current_url == served + "/"  # sent in the background, not by navigating
    assert driver.execute_script("return window.busySeen") and not driver.find_element(By.ID, "busy").is_displayed()
    for image_id in ("photo", "result-image"):
        assert driver.execute_script(f"return document.getElementById('{image_id}').naturalWidth") == 120

    # Side by side: the photo and the result on one row at desktop width.
    photo_box, canvas_box = (driver.find_element(By.ID, "photo").rect, canvas.rect)
    assert photo_box["y"] == canvas_box["y"] and photo_box["x"] + photo_box["width"] <= canvas_box["x"]
    screenshot(driver, "desktop-result.png")

    rows = driver.find_elements(By.CSS_SELECTOR, "#legend tr[data-class-id]")
    names = {int(row.get_attribute("data-class-id")): row.find_element(By.CLASS_NAME, "name").text for row in rows}
    assert len(names) == 3 and names[2] == "<b>tag</b>"  # escaped by the server, shown as text

    mask_url = served + driver.find_element(By.ID, "legend").get_attribute("data-mask-url")
    class_ids = np.asarray(Image.open(io.BytesIO(requests.get(mask_url, timeout=30).content)))
    colours = {int(r.get_attribute("data-class-id")): hex_rgb(r.get_attribute("data-colour")) for r in rows}
    water, tag = interior_pixel(class_ids, 1), interior_pixel(class_ids, 2)

    slider, before = driver.find_element(By.ID, "opacity"), canvas_data(driver)
    slider.send_keys(Keys.END)  # the slider's classes end: class pixels take their colour
    wait_for(driver, lambda d: canvas_data(d) != before)
    coloured = canvas_data(driver)
    assert pixel(driver, "result-canvas", *water) == colours[1] and pixel(driver, "result-canvas", *tag) == colours[2]
    row = next(r for r in rows if r.get_attribute("data-class-id") == "1")
    row.click()
    wait_for(driver, lambda d: canvas_data(d) != coloured)
    assert row.get_attribute("aria-selected") == "true"
    driver.find_element(By.TAG_NAME, "h1").click()  # pointer off the legend: the clicked class stays highlighted
    assert pixel(driver, "result-canvas", *water) == colours[1]  # only that class coloured, the rest dimmed
    dimmed = [round(0.3 * value) for value in pixel(driver, "photo", *tag)]
    assert all(abs(a - b) <= 1 for a, b in zip(pixel(driver, "result-canvas", *tag), dimmed, strict=True))
    screenshot(driver, "desktop-highlight.png")
    row.click()  # again: unselected, and once the pointer leaves the legend every class is back
    assert row.get_attribute("aria-selected") == "false"
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    wait_for(driver, lambda d: canvas_data(d) == coloured)

    caption = driver.find_element(By.ID, "pointer-class")
    for class_id in names:
        point_at(driver, canvas, *interior_pixel(class_ids, class_id), 120, 80)
        wait_for(driver, lambda d, c=class_id: caption.text == names[c], 10)
    screenshot(driver, "desktop-pointer.png")

    downloads = {"download-overlay": ("image/jpeg", "JPEG"), "download-mask": ("image/png", "PNG")}
    for link_id, (mimetype, image_format) in downloads.items():
        response = requests.get(driver.find_element(By.ID, link_id).get_attribute("href"), timeout=30)
        assert response.headers["Content-Type"] == mimetype
        assert Image.open(io.BytesIO(response.content)).format == image_format
    answer = requests.get(driver.find_element(By.ID, "download-json").get_attribute("href"), timeout=30)
    assert answer.headers["Content-Type"] == "application/json" and answer.json()["mask_url"] == mask_url

    driver.set_window_size(390, 1400)  # a phone's width: one column, nothing wider than the screen
    photo_box, canvas_box = (driver.find_element(By.ID, "photo").rect, canvas.rect)
    assert canvas_box["y"] >= photo_box["y"] + photo_box["height"]
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(driver, "phone-result.png")


def drop_or_paste_script(kind: str) -> str:
    """JavaScript that hands the page arguments[0] (base64 JPEG) as a dropped or pasted file."""
    event = ("new DragEvent('drop', {dataTransfer: transfer, bubbles: true})" if kind == "drop"
             else "new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true})")
    return f"""const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], '{kind}.jpg', {{type: 'image/jpeg'}}));
        document.body.dispatchEvent({event});"""


def test_browser_takes_dropped_and_pasted_images_and_shows_errors(served, chrome, tmp_path):
    from selenium.webdriver.common.by import By

    driver = chrome()
    driver.get(served + "/")
    canvas = None
    for kind, width in (("drop", 100), ("paste", 90)):
        driver.execute_script(drop_or_paste_script(kind), base64.b64encode(jpeg(width, 60, width)).decode())
        canvas = enhanced_result(driver, canvas)
        assert canvas.get_attribute("width") == str(width)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    driver.find_element(By.NAME, "file").send_keys(str(text))
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    error = wait_for(driver, lambda d: (d.find_elements(By.ID, "error") or [None])[0])
    assert "not an image" in error.text and not driver.find_elements(By.ID, "result-canvas")
    assert not driver.find_element(By.ID, "busy").is_displayed()
    screenshot(driver, "desktop-error.png")


def test_browser_without_javascript_still_gets_the_result_page(served, chrome, tmp_path):
    from selenium.webdriver.common.by import By

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(120, 80, 7, smooth=True))
    driver = chrome(javascript=False)
    driver.get(served + "/")
    driver.find_element(By.NAME, "file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    image = wait_for(driver, lambda d: (d.find_elements(By.ID, "result-image") or [None])[0])
    wait_for(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert driver.execute_script("return arguments[0].naturalWidth", image) == 120
    assert image.is_displayed() and driver.find_element(By.ID, "photo").is_displayed()
    assert not driver.find_elements(By.ID, "result-canvas")  # the script did not run
    assert not driver.find_element(By.CSS_SELECTOR, ".controls").is_displayed()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#legend tr[data-class-id]")) == 3
    screenshot(driver, "nojs-result.png")
