"""A real ``streamlit run app.py`` in headless Chromium: the heatmap page renders the cache, the
ISLE page its assignment with the per-class confidence and the cross-validated gain."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import REPO

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1100")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cache_dir: Path, root: Path, **env_vars: str) -> tuple[subprocess.Popen, str]:
    """A fresh ``streamlit run app.py`` on a free loopback port, with ``env_vars`` added to this
    process's environment; ``(process, url)`` once healthy."""
    port = _free_port()
    env = {**os.environ, "ISLE_CACHE_DIR": str(cache_dir), "ISLE_VOC_ROOT": str(root), **env_vars}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "streamlit did not start"
            time.sleep(0.3)
    return server, url


@pytest.fixture
def served_app(baseline_cache):
    server, url = _serve(*baseline_cache)
    yield url
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian chromium and chromium-driver are needed (make browser)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _sidebar_links(browser, url: str) -> list[str] | None:
    """The sidebar's hrefs relative to ``url``; None while a rerun replaces them (stale elements)."""
    try:
        return [a.get_attribute("href").removeprefix(url)
                for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')]
    except StaleElementReferenceException:
        return None


def _wait(browser, seconds: float) -> WebDriverWait:
    """A wait that retries a condition whose elements a Streamlit rerun replaced meanwhile."""
    return WebDriverWait(browser, seconds, ignored_exceptions=(StaleElementReferenceException,))


def _texts(browser, css: str) -> list[str]:
    """The text of every element matching ``css``, read in one script call so a rerun cannot
    replace an element between finding it and reading it."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)", css)


def _follow_sidebar(browser, url: str, page: str) -> WebDriverWait:
    """Open the app and click the sidebar link to ``page``, as a user does."""
    browser.get(url)
    wait = _wait(browser, 90)
    link = wait.until(EC.element_to_be_clickable((By.PARTIAL_LINK_TEXT, page)))
    # The sidebar can be ready before the page body: wait for the title rather than assume it.
    wait.until(lambda d: any("ISLE Workbench" in h.text for h in d.find_elements(By.TAG_NAME, "h1")))
    link.click()
    return wait


ROUTER_LINKS = ["/", "/per-class-iou", "/ensemble", "/pseudo-label-qa", "/train"]
DEEP_LINKS = {"/": "ISLE Workbench", "/home": "ISLE Workbench", "/per-class-iou": "Per-class IoU",
              "/ensemble": "ISLE ensemble", "/pseudo-label-qa": "Pseudo-label QA", "/train": "Train"}


@pytest.mark.parametrize("path", DEEP_LINKS)
def test_every_page_url_opens_cleanly_as_a_fresh_servers_first_request(path, baseline_cache, browser):
    """A deep link as the very first request of a new server: the page itself, through app.py's
    router (its sidebar), with no "Page not found" dialog and the URL kept."""
    server, url = _serve(*baseline_cache)
    try:
        browser.get(url + path)
        wait = _wait(browser, 90)
        wait.until(lambda d: any(h.text == DEEP_LINKS[path] for h in d.find_elements(By.TAG_NAME, "h1")))
        wait.until(lambda d: _sidebar_links(d, url) == ROUTER_LINKS)  # app.py's router
        time.sleep(1)  # a "Page not found" dialog would come with the first script run's messages
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Page not found" not in body and "Traceback" not in body
        assert browser.current_url.removeprefix(url) == path
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_heatmap_page_renders_in_chromium(served_app, browser, tmp_path):
    wait = _follow_sidebar(browser, served_app, "Per-class IoU")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot .heatmaplayer")))
    # the heatmap, not the threshold-sweep chart that may render before it
    heatmap = "//div[contains(@class, 'js-plotly-plot')][.//*[contains(@class, 'heatmaplayer')]]"
    wait.until(lambda d: "mIoU" in d.find_element(By.XPATH, heatmap).text)
    plot_text = browser.find_element(By.XPATH, heatmap).text
    assert "→ dCRF" in plot_text and "cat (" in plot_text
    assert "aeroplane" not in plot_text  # classes without images are hidden by default, and named
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert "No image of aeroplane" in page_text
    assert "Per-class IoU" in page_text and "Traceback" not in page_text and "Page not found" not in page_text
    assert browser.current_url.endswith("/per-class-iou")
    _wait(browser, 30).until(lambda d: _sidebar_links(d, served_app) == ROUTER_LINKS)  # app.py's router
    shot = tmp_path / "heatmap.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("ISLE_SCREENSHOT"):
        shutil.copy(shot, os.environ["ISLE_SCREENSHOT"])

    # The gain view: one row, dCRF against its source, with signed differences.
    browser.find_element(By.XPATH, "//label[.//p[text()='gain vs source']]").click()
    wait.until(lambda d: "IoU gain" in d.find_element(By.XPATH, heatmap).text)
    gain_text = browser.find_element(By.XPATH, heatmap).text
    assert "→ dCRF" in gain_text and "mIoU" in gain_text
    assert any(sign in gain_text for sign in ("+", "−"))


def test_ensemble_page_renders_and_an_override_updates_the_prediction(served_app, browser, baseline_cache):
    from cache.db import connect
    from engine.core.chains import dataset_id_for
    from engine.isle import assignments

    cache_dir, root = baseline_cache
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        candidates = [c.variant.id for c in assignments.complete_variants(con, dataset_id, "train") if c.default]
        plan = assignments.build_plan(con, dataset_id, "train", candidates)
        summary = assignments.summary(con, plan)
    # A class with images on which the other candidate differs, and the prediction with it.
    entry = next(e for e in summary.classes if e.images and len(set(e.candidate_iou.values())) > 1)
    other = next(v for v in plan.candidates if v != entry.variant)
    with connect(cache_dir, read_only=True) as con:
        overridden = assignments.build_plan(con, dataset_id, "train", candidates, overrides={entry.class_id: other})
        checked = assignments.validate(con, plan, k=5)

    wait = _follow_sidebar(browser, served_app, "ISLE ensemble")
    wait.until(lambda d: "ISLE predicted" in d.find_element(By.TAG_NAME, "body").text)
    assert browser.current_url.endswith("/ensemble")

    def metric(label: str) -> str | None:
        return browser.execute_script(
            "const m = Array.from(document.querySelectorAll('[data-testid=\"stMetric\"]'))"
            ".find(e => e.innerText.includes(arguments[0]));"
            "return m ? m.querySelector('[data-testid=\"stMetricValue\"]').innerText : null;", label)

    def predicted() -> str | None:
        return metric("ISLE predicted")

    def signed(value: float, decimals: int = 2) -> str:
        return f"{value:+.{decimals}f}".replace("-", "\u2212")

    assert predicted() == f"{summary.miou.selection.predicted:.2f}"
    # Beside it the gain in-sample and cross-validated, and per class row the bootstrap's verdict.
    cv = checked.cv[0]
    wait.until(lambda d: metric("ISLE gain, cross-validated (k = 5)") == f"{signed(cv.gain)} ± {cv.spread:.2f}")
    assert metric("ISLE gain, in-sample") == signed(checked.in_sample_gain)
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=\"stHorizontalBlock\"]'),"
        " b => Array.from(b.querySelectorAll(':scope > [data-testid=\"stColumn\"]'), c => c.innerText))"
        ".filter(cells => cells.length === 7);")
    confidence = {cells[0].split(" (")[0]: cells[4] for cells in rows}
    for conf in checked.classes:
        cell = confidence[conf.class_name]
        assert conf.verdict in cell and ("⚠" in cell) == (conf.verdict == "coin flip")
        if conf.rival is not None:
            assert f"wins {conf.share:.0%} vs {conf.rival_name}" in cell
            assert f"{signed(conf.low, 1)} to {signed(conf.high, 1)}" in cell
    body = browser.find_element(By.TAG_NAME, "body").text
    assert all(f"{e.class_name} ({e.images})" in body for e in summary.classes)
    assert "Traceback" not in body and "overridden" not in body
    labels = [label.get_attribute("textContent").strip()
              for label in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSelectbox"] label')]
    assert [x for x in labels if x.endswith(" variant")] == [f"{e.class_name} variant" for e in summary.classes]

    # Override the class in the browser: the predicted mIoU changes to the engine's figure.
    select = browser.find_element(By.XPATH, f"//div[@data-testid='stSelectbox'][.//input[@aria-label="
                                            f"'{entry.class_name} variant']]")
    select.find_element(By.CSS_SELECTOR, 'button[aria-haspopup="listbox"]').click()
    option = wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//*[@role='option'][normalize-space()='{plan.names[plan.candidates.index(other)]}']")))
    expected = f"{100 * overridden.predicted['selection'].miou:.2f}"
    assert expected != predicted()
    option.click()
    wait.until(lambda d: predicted() == expected)
    assert "overridden" in browser.find_element(By.TAG_NAME, "body").text


def test_a_heatmap_cell_opens_its_worst_images_and_the_overlay_renders(served_app, browser, baseline_cache):
    import io

    import numpy as np
    from PIL import Image

    from cache import qa, queries, reports
    from cache.classes import VOC
    from cache.db import connect
    from cache.labelmaps import read_label_map
    from engine.core.chains import dataset_id_for
    from engine.core.dataset import read_image
    from ui.overlays import overlay

    cache_dir, root = baseline_cache
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "train")
        row = table.names.index(next(n for n in table.names if "dCRF" not in n))  # the CAM row
        class_id = int(np.argmax(table.n_images[row, 1:])) + 1
        images = queries.class_image_counts(con, dataset_id, "train")
        shown = [c for c in range(VOC.num_classes) if images.get(c)]  # the columns, empty ones hidden
        worst = qa.find_images(con, dataset_id, qa.ImageQuery("train", variant=table.variant_ids[row],
                                                               class_id=class_id, sort="errors"), limit=100)
        label_path = cache_dir / qa.image_label_maps(con, dataset_id, worst.rows[0]["image_id"])[table.variant_ids[row]][0]

    wait = _follow_sidebar(browser, served_app, "Per-class IoU")
    targets = ".js-plotly-plot .subplot.x2y2 .scatterlayer .point"  # the class panel's click targets
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, targets)))
    # One click on the (CAM, class) cell: its invisible click target, row by row over the shown columns.
    cell = browser.find_elements(By.CSS_SELECTOR, targets)[row * len(shown) + shown.index(class_id)]
    webdriver.ActionChains(browser).move_to_element(cell).click().perform()
    wait.until(lambda d: "/pseudo-label-qa?" in d.current_url)
    assert f"class={VOC.name(class_id)}" in browser.current_url and "sort=errors" in browser.current_url
    wait.until(lambda d: len(d.find_elements(By.XPATH, "//button[normalize-space()='Open']")) == worst.total)
    ids = {r["image_id"] for r in worst.rows}

    def caption_ids() -> list[str]:
        return [c.split(" ")[0] for c in _texts(browser, '[data-testid="stCaptionContainer"]')
                if c.split(" ")[0] in ids]

    wait.until(lambda d: len(caption_ids()) == len(worst.rows))
    assert caption_ids() == [r["image_id"] for r in worst.rows]  # most error pixels first

    # Open the worst image: CAM's overlay next to the ground truth's, and the class legend.
    browser.find_elements(By.XPATH, "//button[normalize-space()='Open']")[0].click()
    image_id = worst.rows[0]["image_id"]
    wait.until(lambda d: "/pseudo-label-qa?" in d.current_url and f"image={image_id}" in d.current_url)
    wait.until(lambda d: "Classes in this image" in d.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')) >= 2)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert image_id in body and "Traceback" not in body and "ground truth" in body
    shown = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')[0]
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", shown))
    with urllib.request.urlopen(shown.get_attribute("src"), timeout=10) as response:
        rendered = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), np.int16)
    expected = overlay(read_image(Path(worst.rows[0]["image_path"])), read_label_map(label_path), VOC, 0.6)
    assert rendered.shape == expected.shape
    assert np.abs(rendered - expected).mean() < 2.0  # the overlay as computed, through the browser's encoder
