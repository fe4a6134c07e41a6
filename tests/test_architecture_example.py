"""docs/architecture.md's "add a method in one file": the example, saved as one new module in
engine/methods/, is registered, labels real images, and is listed on Home, with nothing else
changed. The module is written for the test and removed after it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BEGIN, END = "<!-- example: engine/methods/centre_prior.py -->", "<!-- end example -->"

CHECK = """
import json, sys
from pathlib import Path
from streamlit.testing.v1 import AppTest
from cache.classes import VOC
from engine.core import registry
from engine.core.registry import Role
from engine.core.types import RunContext
from tests.conftest import VOC_ROOT, split_items

plugin = registry.get("centre-prior")
items = split_items(VOC_ROOT, "train", 2)
results = list(plugin.run(plugin.make_config({"radius": 0.3}),
                          RunContext(classes=VOC, items=items, todo=items, workdir=Path(sys.argv[1]))))
home = AppTest.from_file("app_pages/home.py", default_timeout=60).run()
print(json.dumps({
    "role": plugin.role.value, "title": plugin.title, "module": plugin.run.__module__,
    "labels": [sorted(int(v) for v in set(r.label.ravel().tolist())) for r in results],
    "image_labels": [list(item.labels) for item in items],
    "centre": [int(r.label[r.label.shape[0] // 2, r.label.shape[1] // 2]) for r in results],
    "corner": [int(r.label[0, 0]) for r in results],
    "shapes": [list(r.label.shape) == [item.height, item.width] for r, item in zip(results, items)],
    "methods_on_home": home.selectbox(key="method").options, "exception": bool(home.exception),
}))
"""


def _example() -> str:
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert block.startswith("```python") and block.endswith("```")
    return block.removeprefix("```python").removesuffix("```").lstrip("\n")


def test_a_new_method_is_one_file(tmp_path: Path):
    module = REPO / "engine" / "methods" / f"_example_centre_prior_{os.getpid()}.py"
    module.write_text(_example())
    try:
        env = {**os.environ, "ISLE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        module.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["role"] == "method" and seen["module"] == f"engine.methods.{module.stem}"
    assert all(seen["shapes"]) and seen["corner"] == [0, 0]
    assert seen["centre"] == [labels[0] for labels in seen["image_labels"]]
    assert [set(v) for v in seen["labels"]] == [{0, labels[0]} for labels in seen["image_labels"]]
    assert "centre prior" in seen["methods_on_home"] and not seen["exception"]
