"""engine/core/roots.py: every path a user gives the app or the command line lies under the data
roots. The bad-path battery (a folder outside the roots, ``..``, a symlink leading out, an
absolute path to a system file) is refused by every page and command that takes a path, with a
message naming the path and the roots, before anything is read or queued."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cache.labelmaps import write_label_map
from engine.core.roots import ENV_DATA_ROOTS, ENV_EXPORT_ROOTS, DataRoots, PathRefused
from engine.runtime import cli
from tests.conftest import REPO, VOC_ROOT, _split_ids


@pytest.fixture
def outside() -> Path:
    """A real import folder (ground-truth label maps) outside every root: refused for where it
    is, not for what it holds."""
    folder = Path(tempfile.mkdtemp(prefix="outside-roots-")).resolve()
    for image_id in _split_ids("train")[:2]:
        write_label_map(folder / f"{image_id}.png", np.zeros((4, 4), np.uint8))
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def battery(outside, tmp_path) -> dict[str, str]:
    """The bad paths, each of which must be refused."""
    link = tmp_path / "inside-link"
    link.symlink_to(outside, target_is_directory=True)
    return {"outside the roots": str(outside), "..": str(tmp_path / "a" / ".." / ".." / ".." / "etc"),
            "symlink out": str(link), "system file": "/etc/passwd"}


# --- the rule ----------------------------------------------------------------------------------


def test_defaults_are_the_bundled_data_the_dataset_the_cache_and_its_exports(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATA_ROOTS, raising=False)
    monkeypatch.delenv(ENV_EXPORT_ROOTS, raising=False)
    monkeypatch.delenv("ISLE_VOC_ROOT", raising=False)
    roots = DataRoots.configured(tmp_path / "cache")
    assert roots.read == ((REPO.parent / "shared" / "data").resolve(), VOC_ROOT, (tmp_path / "cache").resolve(),
                          (tmp_path / "cache" / "exports").resolve())
    assert roots.write == ((tmp_path / "cache" / "exports").resolve(),)
    assert roots.check_read(VOC_ROOT / "JPEGImages", "x") == VOC_ROOT / "JPEGImages"
    assert roots.check_write(tmp_path / "cache" / "exports" / "mine", "x") == (tmp_path / "cache" / "exports" / "mine").resolve()
    with pytest.raises(PathRefused, match="not under a folder that may be written"):
        roots.check_write(tmp_path / "cache", "export destination")  # the cache's own files stay safe
    monkeypatch.setenv(ENV_DATA_ROOTS, f"{tmp_path / 'lab'}:{tmp_path / 'more'}")
    monkeypatch.setenv(ENV_EXPORT_ROOTS, str(tmp_path / "out"))
    roots = DataRoots.configured(tmp_path / "cache")
    assert roots.read[-2:] == ((tmp_path / "lab").resolve(), (tmp_path / "more").resolve())
    assert roots.write == ((tmp_path / "cache" / "exports").resolve(), (tmp_path / "out").resolve())


def test_the_battery_is_refused_naming_the_path_and_the_roots(battery, tmp_path):
    roots = DataRoots.configured(tmp_path / "cache")
    for kind, path in battery.items():
        for check, allowed in ((roots.check_read, roots.read), (roots.check_write, roots.write)):
            with pytest.raises(PathRefused) as refused:
                check(path, "import folder")
            message = str(refused.value)
            assert message.startswith(f"import folder {path!r}: refused"), kind
            assert all(str(root) in message for root in allowed), kind
    # '..' is refused even where the path would resolve inside a root
    with pytest.raises(PathRefused, match="'..' is not allowed"):
        roots.check_read(str(tmp_path / "x" / ".."), "x")


def test_path_parameters_of_plugins_are_checked(battery, tmp_path):
    from engine.core.chains import Step

    roots = DataRoots.configured(tmp_path / "cache")
    for kind, path in battery.items():
        for step in (Step("import", {"folder": path}), Step("tkp-pcl", {"vit_weights": path}),
                     Step("deeplab", {"encoder_weights": path})):
            with pytest.raises(PathRefused, match=rf"{step.name}\.\w+ .*refused"):
                roots.check_steps([step])
    roots.check_steps([Step("import", {"folder": str(tmp_path)}), Step("cam", {"bg_threshold": 0.2})])


# --- every command that takes a path -----------------------------------------------------------


COMMANDS = {
    "import": lambda bad: ["import", bad],
    "--dataset": lambda bad: ["--dataset", bad, "status"],
    "export": lambda bad: ["export", bad, "--variant", "v"],
    "isle --export": lambda bad: ["isle", "--name", "x", "--export", bad],
    "run --param import.folder": lambda bad: ["run", "import", "--param", f"import.folder={bad}"],
    "run --param tkp-pcl.vit_weights": lambda bad: ["run", "tkp-pcl", "--param", f"tkp-pcl.vit_weights={bad}"],
    "train --param deeplab.encoder_weights": lambda bad: ["train", "gt", "--param", f"deeplab.encoder_weights={bad}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_the_battery_before_anything_is_read(command, battery, tmp_path):
    cache = tmp_path / "cache"
    for kind, bad in battery.items():
        with pytest.raises(SystemExit) as refused:
            cli.main(["--cache", str(cache), *COMMANDS[command](bad)])
        assert f"{bad!r}: refused" in str(refused.value.code), (command, kind)
        assert not cache.exists(), (command, kind)  # nothing queued, no cache made


# --- every page that takes a path ------------------------------------------------------------


def _page(name: str) -> AppTest:
    return AppTest.from_file(str(REPO / "app_pages" / name), default_timeout=60)


def test_the_home_import_form_refuses_the_battery(battery, tmp_path, monkeypatch):
    monkeypatch.setenv("ISLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # AppTest runs pages as __main__
    at = _page("home.py").run()
    for kind, bad in battery.items():
        at.text_input(key="import_folder").input(bad).run()
        at.button(key="queue_import").click().run()
        assert not at.exception and f"import folder {bad!r}: refused" in at.error[0].value, kind
        assert not (tmp_path / "cache").exists(), kind


def test_the_ensemble_export_refuses_the_battery(cache_copy, battery, monkeypatch):
    cache_dir, root, *_ = cache_copy
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # AppTest runs pages as __main__
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    at = _page("ensemble.py").run()
    at.text_input(key="assignment_name").input("mine").run()
    at.button(key="save_assignment").click().run()
    for kind, bad in battery.items():
        at.text_input(key="export_dest").input(bad).run()
        at.button(key="export").click().run()
        assert not at.exception and f"export destination {bad!r}: refused" in at.error[0].value, kind
    assert not (cache_dir / "exports").exists()
