"""Team mode (ui/auth.py): with ``[team.users]`` in the app's secrets every page is behind a
sign-in, in AppTest and in headless Chromium; queued jobs, assignment versions, trainings and
flags record who made them and the pages show it. Without the table the app asks nothing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from streamlit.testing.v1 import AppTest

from cache import qa, queries
from cache.db import connect
from engine.core.chains import dataset_id_for
from tests.conftest import REPO
from tests.test_browser import _serve, _wait, browser  # noqa: F401  (the Chromium fixture)

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def alice_hash() -> str:
    from ui.auth import hash_password

    return hash_password(PASSWORD, salt=b"0123456789abcdef", iterations=1_000)  # fast for tests; same code path


def test_hashes_verify_only_the_right_password():
    from ui.auth import hash_password, verify_password

    stored = hash_password(PASSWORD)
    algorithm, iterations, salt, digest = stored.split("$")
    assert algorithm == "pbkdf2_sha256" and int(iterations) == 600_000 and len(bytes.fromhex(salt)) == 16
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "!", stored)
    assert hash_password(PASSWORD) != stored  # a new salt each time
    assert not verify_password(PASSWORD, "plain text") and not verify_password(PASSWORD, "md5$1$00$00")


def _app(alice_hash: str, monkeypatch, cache_dir: Path, root: Path) -> AppTest:
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # AppTest runs the app as __main__
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.secrets["team"] = {"users": {"alice": alice_hash}}
    return at


def test_without_sign_in_nothing_but_the_form_and_after_it_the_pages(alice_hash, baseline_cache, monkeypatch):
    at = _app(alice_hash, monkeypatch, *baseline_cache).run()
    assert not at.exception
    assert [t.key for t in at.text_input] == ["sign_in_user", "sign_in_password"]  # no page ran
    assert not [b for b in at.button if b.key == "queue_import"]
    at.text_input(key="sign_in_user").input("alice")
    at.text_input(key="sign_in_password").input("wrong")
    at.button[0].click().run()
    assert "Unknown user or wrong password" in at.error[0].value
    assert [t.key for t in at.text_input] == ["sign_in_user", "sign_in_password"]
    at.text_input(key="sign_in_password").input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception and at.session_state["signed_in_user"] == "alice"
    assert any(t.key == "import_folder" for t in at.text_input)  # Home ran
    assert any("Signed in as **alice**" in c.value for c in at.sidebar.caption)
    at.sidebar.button(key="sign_out").click().run()
    assert [t.key for t in at.text_input] == ["sign_in_user", "sign_in_password"]


def test_single_user_mode_asks_nothing(baseline_cache, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(baseline_cache[0]))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(baseline_cache[1]))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception and not [t for t in at.text_input if t.key == "sign_in_user"]
    assert any(t.key == "import_folder" for t in at.text_input)


def _page(name: str, user: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app_pages" / name), default_timeout=60)
    at.session_state["signed_in_user"] = user  # as app.py leaves it after the sign-in
    return at


def test_jobs_assignments_trainings_and_flags_record_who_and_the_pages_show_it(cache_copy, monkeypatch, tmp_path):
    from cache.labelmaps import write_label_map
    import numpy as np

    cache_dir, root, *_ = cache_copy
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    dataset_id = dataset_id_for(root)

    folder = tmp_path / "labels"  # a queued job (Home's import)
    with connect(cache_dir, read_only=True) as con:
        image_id = queries.usable_image_ids(con, dataset_id, "train")[0]
    write_label_map(folder / f"{image_id}.png", np.zeros((2, 2), np.uint8))
    home = _page("home.py", "alice").run()
    home.text_input(key="import_folder").input(str(folder))
    home.text_input(key="import_name").input("alice's labels").run()
    home.button(key="queue_import").click().run()
    assert not home.exception
    with connect(cache_dir, read_only=True) as con:
        job = next(j for j in queries.recent_jobs(con) if j.variant_name == "alice's labels")
    assert job.created_by == "alice"
    jobs_table = next(f.value for f in _page("home.py", "alice").run().dataframe if "by" in f.value.columns)
    assert "alice" in set(jobs_table["by"])

    ensemble = _page("ensemble.py", "bob").run()  # an assignment version
    ensemble.text_input(key="assignment_name").input("bobs").run()
    ensemble.button(key="save_assignment").click().run()
    assert not ensemble.exception
    with connect(cache_dir, read_only=True) as con:
        (version,) = queries.assignment_history(con, dataset_id, "train", "bobs")
    assert version["created_by"] == "bob"
    versions = next(f.value for f in ensemble.dataframe if "differs from Algorithm 2" in f.value.columns)
    assert list(versions["by"]) == ["bob"]

    train = _page("train.py", "carol").run()  # a training
    train.button(key="train_submit").click().run()
    assert not train.exception
    with connect(cache_dir, read_only=True) as con:
        trainings = [j for j in queries.recent_jobs(con) if j.variant_name and "DeepLabV3+" in j.variant_name]
    assert trainings and all(j.created_by == "carol" for j in trainings)

    with connect(cache_dir) as con:  # a flag, as the QA page's Flag button records it
        qa.set_flag(con, dataset_id, image_id, next(iter(qa.FLAG_KINDS)), "looks wrong", None, "dave")
    with connect(cache_dir, read_only=True) as con:
        assert qa.flags(con, dataset_id)[0]["created_by"] == "dave"


def test_team_mode_in_chromium_shows_only_the_sign_in_until_signed_in(alice_hash, baseline_cache, browser,
                                                                      tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'[team.users]\nalice = "{alice_hash}"\n')
    server, url = _serve(*baseline_cache, STREAMLIT_SECRETS_FILES=str(secrets))
    try:
        browser.get(url)
        wait = _wait(browser, 90)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'input[type="password"]'))
        time.sleep(1)  # a page that wrongly ran would have drawn its widgets by now
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')
        assert "Team mode: sign in" in browser.find_element(By.TAG_NAME, "body").text
        user, password = browser.find_elements(By.CSS_SELECTOR, "input")[:2]
        user.send_keys("alice")
        password.send_keys(PASSWORD)
        browser.find_element(By.XPATH, "//button[.//p[text()='Sign in']]").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a'))
        wait.until(lambda d: "Signed in as" in d.find_element(By.TAG_NAME, "body").text)
        links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')]
        assert any("Per-class IoU" in text for text in links)
    finally:
        server.terminate()
        server.wait(timeout=20)
