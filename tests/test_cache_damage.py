"""A damaged cache file (garbage, a zeroed header, cut short, empty): the command line, the worker
and the app say what is wrong and how to recover, and the file is never rewritten."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cache.db import CacheCorrupt, connect, db_path
from engine.core.chains import Step
from engine.runtime.jobs import submit_chain
from engine.runtime.worker import WorkerConfig, serve
from tests.conftest import REPO, _split_ids, make_voc_copy

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A real cache: 6 train images scanned and the ground truth imported by the worker."""
    base = tmp_path_factory.mktemp("damage")
    root = make_voc_copy(base / "voc", {"train": _split_ids("train")[:6]})
    submit_chain(base / "cache", root, "train", [Step("ground-truth")])
    serve(WorkerConfig(base / "cache", until_idle=True, poll_seconds=0.05, processes=1))
    return base / "cache", root


def _cut_short(data: bytes) -> bytes:
    return data[:max(16384, len(data) // 50)]  # the headers kept, the catalogue and tables cut away


DAMAGE = {
    "garbage": lambda data: os.urandom(len(data)),
    "zeroed header": lambda data: b"\0" * 4096 + data[4096:],
    "cut short": _cut_short,
    "empty": lambda data: b"",
}


@pytest.fixture(params=list(DAMAGE))
def damaged_cache(request, good_cache, tmp_path) -> tuple[Path, Path, str]:
    """``(cache dir, dataset root, sha1 of the damaged file)``: a copy of the good cache whose
    DuckDB file is damaged as the parameter says."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(good_cache[0], cache_dir)
    path = db_path(cache_dir)
    path.write_bytes(DAMAGE[request.param](path.read_bytes()))
    return cache_dir, good_cache[1], _sha1(path)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _says_what_and_how(text: str, cache_dir: Path) -> None:
    path = db_path(cache_dir)
    assert f"{path}: the cache database is damaged" in text
    assert f"mv {path} {path}.damaged" in text and "It was left as it is" in text


def test_connect_raises_cache_corrupt_for_readers_and_writers(damaged_cache):
    cache_dir, _, sha = damaged_cache
    for read_only in (True, False):
        with pytest.raises(CacheCorrupt) as refused:
            with connect(cache_dir, read_only=read_only) as con:
                for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
                    con.execute(f'SELECT * FROM "{table}"').fetchall()
        _says_what_and_how(str(refused.value), cache_dir)
        assert _sha1(db_path(cache_dir)) == sha


@pytest.mark.parametrize("command", [["status"], ["worker", "--until-idle"], ["run", "cam"]])
def test_the_command_line_says_what_is_wrong_and_leaves_the_file(damaged_cache, command):
    cache_dir, root, sha = damaged_cache
    done = subprocess.run([sys.executable, "-m", "engine", "--cache", str(cache_dir), "--dataset", str(root), *command],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    _says_what_and_how(done.stderr, cache_dir)
    assert "Traceback" not in done.stderr
    assert _sha1(db_path(cache_dir)) == sha


def test_the_app_says_what_is_wrong_and_leaves_the_file(damaged_cache, monkeypatch):
    cache_dir, root, sha = damaged_cache
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # AppTest runs the app as __main__
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not at.exception
    _says_what_and_how(at.error[0].value, cache_dir)
    assert _sha1(db_path(cache_dir)) == sha
