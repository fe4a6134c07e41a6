"""The layers of docs/architecture.md, checked on the source: which module may import which.

cache -> engine.core -> engine.ops -> plugins (engine.methods, engine.refine, engine.isle,
engine.final) -> engine.runtime -> ui -> app_pages -> app.py. A module imports only from layers below
it (its own layer included); a plugin module never imports another plugin module, and a plugin
package never imports another plugin package: what two plugins share lives in core or ops.
Imports are read with ``ast`` (relative ones resolved), so a function-level import counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from engine.core import registry
from tests.conftest import REPO

PLUGIN_PACKAGES = ("engine.methods", "engine.refine", "engine.isle", "engine.final")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [REPO / "app.py", *sorted(REPO.glob("cache/*.py")), *sorted(REPO.glob("engine/**/*.py")),
             *sorted(REPO.glob("ui/*.py")), *sorted(REPO.glob("app_pages/*.py"))]
    return {_module_name(p): p for p in files}


SOURCES = _sources()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, as absolute dotted names (``from a import b`` gives ``a.b``
    when ``a.b`` is a module of the project, else ``a``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base)
    return found


def _registers(path: Path) -> bool:
    """Whether the module registers a plugin (a ``register(...)`` decorator)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                call = decorator.func if isinstance(decorator, ast.Call) else decorator
                if (isinstance(call, ast.Name) and call.id == "register") or \
                        (isinstance(call, ast.Attribute) and call.attr == "register"):
                    return True
    return False


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _package_of(module: str) -> str | None:
    return next((p for p in PLUGIN_PACKAGES if _within(module, p)), None)


def _project(module: str) -> bool:
    return _within(module, "cache", "engine", "ui", "app_pages", "app") or module == "streamlit" \
        or module.startswith("streamlit.")


def _violations(allowed) -> list[str]:
    out = []
    for name, path in SOURCES.items():
        for imported in sorted(_imports(name, path)):
            if _project(imported) and not allowed(name, imported):
                out.append(f"{path.relative_to(REPO)} imports {imported}")
    return out


def test_the_rule_itself_sees_relative_and_function_level_imports():
    found = _imports("engine.isle.export", SOURCES["engine.isle.export"])
    assert "engine.isle.assignments" in found  # ``from .assignments import ...``
    assert _registers(SOURCES["engine.methods.cam"]) and not _registers(SOURCES["engine.isle.numerics"])


def test_cache_imports_nothing_from_the_engine_or_the_app():
    assert _violations(lambda m, i: not _within(m, "cache") or _within(i, "cache")) == []


def test_core_imports_only_the_cache_and_core():
    assert _violations(lambda m, i: not _within(m, "engine.core") or _within(i, "cache", "engine.core")
                       or i == "engine") == []


def test_ops_imports_only_the_cache_core_and_ops():
    assert _violations(lambda m, i: not _within(m, "engine.ops")
                       or _within(i, "cache", "engine.core", "engine.ops")) == []


def test_a_plugin_module_imports_core_ops_and_cache_never_another_plugin_module():
    plugin_modules = {name for name, path in SOURCES.items() if _package_of(name) and _registers(path)}
    assert {"engine.methods.cam", "engine.refine.dcrf", "engine.isle.merge", "engine.final.deeplab"} <= plugin_modules

    def allowed(module: str, imported: str) -> bool:
        package = _package_of(module)
        if package is None or _within(imported, "cache", "engine.core", "engine.ops"):
            return True
        # A package's own library modules (ISLE's numerics) are allowed; plugins and other packages not.
        return _package_of(imported) == package and imported not in plugin_modules

    assert _violations(allowed) == []


def test_the_engine_never_imports_streamlit_the_ui_or_the_pages():
    assert _violations(lambda m, i: not _within(m, "engine") or not _within(i, "streamlit", "ui", "app_pages")) == []


def test_the_ui_imports_no_page_and_pages_import_no_page():
    assert _violations(lambda m, i: not _within(m, "ui", "app_pages") or not _within(i, "app_pages")) == []


def test_pages_hold_layout_and_calls_not_arrays():
    numeric = [f"{path.relative_to(REPO)} imports {i}" for name, path in SOURCES.items() if _within(name, "app_pages")
               for i in _imports(name, path) if _within(i, "numpy", "pandas", "PIL", "torch", "duckdb")]
    assert numeric == []


def test_app_pages_holds_only_the_pages_app_routes_and_there_is_no_legacy_pages_folder():
    text = (REPO / "app.py").read_text()
    routed = set(re.findall(r'"(app_pages/[a-z_]+\.py)"', text))
    assert routed == {f"app_pages/{p.name}" for p in (REPO / "app_pages").glob("*.py")}
    assert not (REPO / "pages").exists()  # Streamlit would serve it in its legacy multipage mode


@pytest.mark.parametrize("plugin", registry.plugins(), ids=lambda p: p.name)
def test_every_plugin_lives_in_a_plugin_package(plugin):
    assert _package_of(plugin.run.__module__), f"{plugin.name} is registered in {plugin.run.__module__}"
