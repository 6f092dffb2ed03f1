"""End to end: the ``serve`` verb on a loopback port, its page driven in headless Chromium (Selenium).

Debian's ``chromium`` and ``chromium-driver`` are used, never a downloaded browser; scripts/test.sh
installs them when missing, so CI runs this test (it fails there instead of skipping).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.data import load_dataset
from retrieval.runner import build_cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

EXPERIMENT = """
from retrieval.runner import main
params = {params!r}
if __name__ == "__main__":
    main(params)
"""


def _browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = f"{CHROMIUM} / {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI: {message}; scripts/test.sh installs them")
        pytest.skip(message)
    pytest.importorskip("selenium")
    pytest.importorskip("fastapi")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"serve not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_page_shows_the_true_match_of_a_benchmark_query_in_chromium(tmp_path):
    driver = _browser()
    try:
        params = {"architecture": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0", "pooling": "gem",
                  "p": 3.0, "whitening": None, "dataset": "synthetic", "synthetic_size": "tiny", "seed": 0,
                  "data_root": str(tmp_path / "data"), "image_size": 224, "resize": "long", "batch_size": 16,
                  "num_workers": 0, "progress": False}
        script = tmp_path / "exp.py"
        script.write_text(EXPERIMENT.format(params=params))
        cli = build_cli(params, name="exp", script=script)
        result = CliRunner().invoke(cli, ["predict", "--splits", "db"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        features = Path(result.stdout.strip().splitlines()[-1])
        ds = load_dataset("synthetic", tmp_path / "data", "tiny", 0)
        gnd = ds.gnd[0]
        positives = {ds.db.ids[j] for j in gnd["easy"] + gnd["hard"]}

        port = _free_port()
        log = tmp_path / "serve.out"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, str(script), "serve", "--features", str(features),
                                     "--port", str(port), "--rerank", "aqe"], stdout=out, stderr=subprocess.STDOUT,
                                    env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, log)
            _drive_page(driver, url, ds.queries.paths[0], ds.queries.bbx(0), positives, tmp_path)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        driver.quit()


def _drive_page(driver, url: str, query: Path, bbx, positives: set[str], tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: "images" in d.find_element(By.ID, "info").text)
    assert [o.text for o in driver.find_elements(By.CSS_SELECTOR, "#rerank option")] == ["none", "aqe"]
    driver.find_element(By.ID, "files").send_keys(str(query))
    canvas = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#queries canvas"))[0]
    # draw the query's revisitop box on the preview (Selenium's offsets are from the canvas centre)
    from PIL import Image

    width, height = driver.execute_script("return [arguments[0].width, arguments[0].height];", canvas)
    scale = width / Image.open(query).width
    x1, y1, x2, y2 = (v * scale for v in bbx)
    cx, cy = width / 2, height / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(x1 - cx) + 1, int(y1 - cy) + 1).click_and_hold() \
        .move_by_offset(int(x2 - x1) - 2, int(y2 - y1) - 2).release().perform()
    label = driver.find_element(By.CSS_SELECTOR, "#queries .box-label").text
    assert " box " in label, label
    driver.find_element(By.ID, "search").click()
    hits = WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure.hit"))
    assert driver.find_element(By.ID, "error").text == ""
    ids = [h.get_attribute("data-id") for h in hits]
    assert len(ids) == 10
    assert positives & set(ids[:3]), f"no true match among the first thumbnails {ids[:3]} (positives {positives})"
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results figure.hit img')].every(i => i.complete && i.naturalWidth)"))
    assert "landmark lm" in hits[[i for i, x in enumerate(ids) if x in positives][0]].text
    shot = tmp_path / "search_page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
