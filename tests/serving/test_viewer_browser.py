"""The viewer in a real headless Chromium (selenium + Debian's chromium and chromium-driver), end to end:
upload an image, the overlay appears, the FPR slider changes the mask exactly as the calibration says;
drop a volume, scrub its slices. Screenshots are written to the test's folder (and to
$NORMDINO_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LiveServer

from normdino import AnomalyDetector
from normdino.serving.app import create_app
from normdino.serving.models import load_models
from normdino.serving.settings import ServeSettings

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1480,860", "--force-device-scale-factor=1")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(served_model):
    with LiveServer(create_app(load_models([str(served_model)]), ServeSettings())) as live:
        yield live


def _wait(driver, script, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def _pixels(driver, canvas_id) -> np.ndarray:
    data = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);", canvas_id)
    return np.asarray(data, dtype=np.uint8)


def _set_range(driver, element_id, value) -> None:
    driver.execute_script("const el = document.getElementById(arguments[0]); el.value = String(arguments[1]);"
                          "el.dispatchEvent(new Event('input', {bubbles: true}));", element_id, value)


def _expected_mask_pixels(server, driver, detector, slice_index=0) -> int:
    """Mask pixels of the shown slice, computed here from the served 16-bit map and the detector's threshold."""
    result = driver.execute_script("return window.normdinoViewer.result;")
    viewer = result["viewer"]
    raw = httpx.get(server.url + viewer["maps"]).content
    maps = np.frombuffer(raw, dtype="<u2").reshape(viewer["n"], viewer["height"], viewer["width"])
    low, high = viewer["map_range"]
    fpr = driver.execute_script("return window.normdinoViewer.fpr;")
    scores = low + maps[slice_index] / 65535 * (high - low)
    return int((scores > detector.pixel_threshold(fpr)).sum())


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    with Image.open(path) as shot:
        assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 5  # a picture, not a blank page
    if os.environ.get("NORMDINO_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["NORMDINO_SCREENSHOT_DIR"]) / name)
    return path


def test_upload_overlay_and_fpr_slider_in_chromium(browser, server, served_model, samples, tmp_path):
    detector = AnomalyDetector.load(served_model, progress=False)
    browser.get(server.url + "/")
    _wait(browser, "return document.querySelectorAll('#model option').length === 1;")
    assert browser.find_element("id", "random-banner").is_displayed()  # the tiny model has random weights

    file_input = browser.find_element("id", "file-input")
    browser.execute_script("arguments[0].hidden = false;", file_input)
    file_input.send_keys(str(samples["png"]))
    browser.execute_script("arguments[0].hidden = true;", file_input)
    _wait(browser, "return document.body.dataset.state === 'ready';")

    image, overlay = _pixels(browser, "canvas-image"), _pixels(browser, "canvas-map")
    assert image.size == 64 * 64 * 4
    assert np.abs(image.astype(int) - overlay).mean() > 1  # the anomaly map is drawn over the image
    start_pixels = browser.execute_script("return window.normdinoViewer.maskPixels;")
    assert start_pixels == _expected_mask_pixels(server, browser, detector)
    verdict = browser.find_element("id", "verdict").text
    assert verdict in ("ANOMALOUS", "NORMAL")

    mask_before = _pixels(browser, "canvas-mask")
    _set_range(browser, "fpr", 1000)  # the largest calibrated FPR: a lower threshold, a larger mask
    wide_pixels = browser.execute_script("return window.normdinoViewer.maskPixels;")
    assert wide_pixels > start_pixels
    assert wide_pixels == _expected_mask_pixels(server, browser, detector)
    assert np.abs(_pixels(browser, "canvas-mask").astype(int) - mask_before).sum() > 0
    assert f"{wide_pixels} px" in browser.find_element("id", "mask-pixels").text

    _set_range(browser, "opacity", 0)  # no overlay: the map panel shows the image itself
    np.testing.assert_array_equal(_pixels(browser, "canvas-map"), image)
    _set_range(browser, "opacity", 55)
    _set_range(browser, "fpr", 600)
    _screenshot(browser, tmp_path, "viewer-image.png")


def test_drop_a_volume_and_scrub_its_slices(browser, server, served_model, samples, tmp_path):
    detector = AnomalyDetector.load(served_model, progress=False)
    browser.get(server.url + "/")
    _wait(browser, "return document.querySelectorAll('#model option').length === 1;")
    payload = base64.b64encode(samples["nifti_gz"].read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'scan.nii.gz'));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    """, payload)
    _wait(browser, "return document.body.dataset.state === 'ready';")
    assert browser.find_element("id", "slice-controls").is_displayed()
    result = browser.execute_script("return window.normdinoViewer.result;")
    assert result["kind"] == "volume" and result["viewer"]["n"] == 4
    for index in range(4):
        _set_range(browser, "slice", index)
        assert browser.execute_script("return window.normdinoViewer.slice;") == index
        assert browser.execute_script("return window.normdinoViewer.maskPixels;") == \
            _expected_mask_pixels(server, browser, detector, index)
    assert "(4 of 4)" in browser.find_element("id", "slice-value").text
    letters = [e.text for e in browser.find_elements("css selector", "#panels .panel:first-child .labels span")]
    assert letters == ["A", "P", "R", "L"]  # radiological view: anterior up, patient's right on the left
    assert not browser.find_element("id", "orientation-note").is_displayed()
    _set_range(browser, "slice", 2)
    _screenshot(browser, tmp_path, "viewer-volume.png")


def test_a_refused_upload_shows_the_servers_sentence(browser, server, tmp_path):
    browser.get(server.url + "/")
    _wait(browser, "return document.querySelectorAll('#model option').length === 1;")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all, just text " * 10)
    file_input = browser.find_element("id", "file-input")
    browser.execute_script("arguments[0].hidden = false;", file_input)
    file_input.send_keys(str(bad))
    _wait(browser, "return document.body.dataset.state === 'error';")
    assert "not a supported file" in browser.find_element("id", "error").text
