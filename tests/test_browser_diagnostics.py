"""The Per-class IoU page's diagnostics in headless Chromium, on a real ``streamlit run app.py``
over the baseline cache (tiny CAM and CAM → dCRF on 8 real VOC images): the background
threshold slider moved by keyboard redraws the heatmap's sweep row at the engine's numbers, and
a click on a confusion-matrix cell opens Pseudo-label QA sorted by that confusion (the images
with most such pixels first, as the engine's per-image confusion sums say).

The server, the browser and the rerun-tolerant waits are those of ``tests/test_browser.py``.
"""

from __future__ import annotations

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from cache import diagnostics, queries, reports
from cache.classes import VOC
from cache.db import connect
from engine.core.chains import dataset_id_for
from tests.test_browser import _follow_sidebar, _serve, _texts, browser  # noqa: F401  (browser: a fixture)
from ui.charts import confusion_cells

HEATMAP, SWEEP_CHART, CONFUSION = 0, 1, 2  # the page's plotly charts, in page order


@pytest.fixture
def served(baseline_cache):
    server, url = _serve(*baseline_cache)
    yield url
    server.terminate()
    server.wait(timeout=20)


def _rows(browser) -> list[tuple[str, str]] | None:
    """The heatmap's rows as drawn: (full row name, the mean column's rendered text), top to
    bottom; None while a rerun replaces the chart."""
    return browser.execute_script(
        """const gd = document.querySelectorAll('.js-plotly-plot')[arguments[0]];
           if (!gd || !gd.data || gd.data.length < 2) return null;
           const texts = Array.from(gd.querySelectorAll('.subplot.xy .heatmaplayer text'), t => t.textContent);
           const names = Array.from(gd.data[1].y);
           return texts.length === names.length ? names.map((n, i) => [n, texts[i]]) : null;""", HEATMAP)


def _move_slider(browser, label: str, key: str) -> None:
    """Focus the slider labelled ``label`` (its hidden range input) and press ``key``, as a keyboard user."""
    handle = browser.find_element(By.CSS_SELECTOR, f'[data-testid="stSlider"] input[aria-label="{label}"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus();", handle)
    webdriver.ActionChains(browser).send_keys(key).perform()


def _slider_value(browser, label: str) -> str | None:
    return browser.execute_script(
        "const i = document.querySelector(`[data-testid=\"stSlider\"] input[aria-label=\"${arguments[0]}\"]`);"
        "return i ? i.getAttribute('aria-valuetext') : null;", label)


def test_moving_the_threshold_slider_redraws_the_sweep_row(served, browser, baseline_cache):
    cache_dir, root = baseline_cache
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        table = reports.iou_table(con, dataset_id, "train")
        cam = queries.swept_variants(con, dataset_id)[0]
        sweep = diagnostics.sweep_table(con, dataset_id, "train", cam)
    grid = sweep.thresholds.tolist()
    wait = _follow_sidebar(browser, served, "Per-class IoU")
    wait.until(lambda d: _slider_value(d, "Background threshold") == "0.30")
    wait.until(lambda d: (rows := _rows(d)) is not None and len(rows) == len(table.names))  # no sweep row yet
    assert [text for _, text in _rows(browser)] == [f"{100 * m:.1f}" for m in table.miou]

    cam_row = table.variant_ids.index(cam)
    seen = []
    for expected in (0.25, 0.20):
        _move_slider(browser, "Background threshold", Keys.ARROW_LEFT)
        wait.until(lambda d: _slider_value(d, "Background threshold") == f"{expected:.2f}")
        miou = f"{100 * sweep.miou[grid.index(expected)]:.1f}"

        def drawn(d) -> bool:
            rows = _rows(d)
            return (rows is not None and len(rows) == len(table.names) + 1
                    and rows[cam_row + 1][0].split(" · ")[0].endswith(f" @ {expected:.2f} (sweep)")
                    and rows[cam_row + 1][1] == miou)

        wait.until(drawn)
        seen.append(miou)
        # The variant's own row stays as it is.
        assert _rows(browser)[cam_row][1] == f"{100 * table.miou[cam_row]:.1f}"
    assert seen[0] != seen[1]  # the row's number changed with the slider
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body and "protocol: split list train" in body

    # Back at its own threshold the sweep row goes away.
    _move_slider(browser, "Background threshold", Keys.ARROW_RIGHT)
    _move_slider(browser, "Background threshold", Keys.ARROW_RIGHT)
    wait.until(lambda d: _slider_value(d, "Background threshold") == "0.30")
    wait.until(lambda d: (rows := _rows(d)) is not None and len(rows) == len(table.names))


def test_a_confusion_cell_opens_qa_sorted_by_that_confusion(served, browser, baseline_cache):
    cache_dir, root = baseline_cache
    dataset_id = dataset_id_for(root)
    with connect(cache_dir, read_only=True) as con:
        cam = queries.confused_variants(con, dataset_id)[0]
        matrix = diagnostics.confusion_matrix(con, dataset_id, "train", cam)
        cat = VOC.index("cat")
        per_image = {i: sum(r["pixels"] for r in queries.confusion_sums(con, dataset_id, "train", cam, [i])
                            if (r["gt"], r["pred"]) == (cat, 0))
                     for i in queries.usable_image_ids(con, dataset_id, "train")}
    expected = sorted(((i, n) for i, n in per_image.items() if n), key=lambda x: (-x[1], x[0]))
    assert len(expected) >= 2 and matrix.pixels[cat, 0] == sum(n for _, n in expected)
    rows, columns = confusion_cells(matrix, "miss")
    index = rows.index(cat) * len(columns) + columns.index(0)  # cat labelled background
    wait = _follow_sidebar(browser, served, "Per-class IoU")
    targets = ".scatterlayer .point"

    def cell(d):
        charts = d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
        if len(charts) <= CONFUSION:
            return None
        points = charts[CONFUSION].find_elements(By.CSS_SELECTOR, targets)
        return points[index] if len(points) == len(rows) * len(columns) else None

    target = wait.until(cell)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", target)
    target = wait.until(cell)  # the same element unless a rerun replaced it meanwhile
    webdriver.ActionChains(browser).move_to_element(target).click().perform()
    wait.until(lambda d: "/pseudo-label-qa?" in d.current_url)
    url = browser.current_url
    for part in ("sort=confusion", "class=cat", "as=background", f"variant={cam}", f"dataset={dataset_id}"):
        assert part in url, url
    wait.until(lambda d: any(h.text == "Pseudo-label QA" for h in d.find_elements(By.TAG_NAME, "h1")))
    # The images holding cat pixels labelled background, most such pixels first (the engine's
    # per-image confusion sums).
    ids = [i for i, _ in expected]

    def listed() -> list[str]:
        return [c.split(" ")[0] for c in _texts(browser, '[data-testid="stCaptionContainer"]')
                if c.split(" ")[0] in ids]

    wait.until(lambda d: listed() == ids)
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
