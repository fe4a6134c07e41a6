"""Data roots: the folders under which the app and the command line read or write for a user.

A lab server's app must not become a way to read or write the server's files. Every path a user
gives (a dataset root, an import folder, a weights file, an export folder) is checked here before
anything is read: it is refused when a component is ``..``, or when, symlinks resolved, it lies
outside the roots. Reads may come from any read root: the bundled data (``../shared/data``), the
default dataset (``$ISLE_VOC_ROOT``), the cache, and the folders of ``$ISLE_DATA_ROOTS``.
Writes go only under the write roots: ``<cache>/exports`` and the folders of
``$ISLE_EXPORT_ROOTS`` (an export into the cache itself could overwrite its files). Both
variables hold paths separated by ``os.pathsep`` (``:``).

A plugin config field that holds a user's path says so in its metadata
(``field(default="", metadata={"path": "read"})``) and ``check_params`` checks it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core import registry
from engine.core.chains import Step
from engine.core.dataset import default_voc_root

ENV_DATA_ROOTS = "ISLE_DATA_ROOTS"
ENV_EXPORT_ROOTS = "ISLE_EXPORT_ROOTS"
REPO = Path(__file__).resolve().parents[2]


class PathRefused(ValueError):
    """A user's path outside the data roots, or with a ``..`` component; nothing was read."""


def _env_paths(name: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in os.environ.get(name, "").split(os.pathsep) if p.strip())


@dataclass(frozen=True)
class DataRoots:
    """Resolved read and write roots (absolute, symlinks followed)."""

    read: tuple[Path, ...]
    write: tuple[Path, ...]

    @classmethod
    def configured(cls, cache_dir: Path) -> DataRoots:
        """The roots for a cache: the defaults above plus ``$ISLE_DATA_ROOTS`` and ``$ISLE_EXPORT_ROOTS``."""
        write = (Path(cache_dir) / "exports", *_env_paths(ENV_EXPORT_ROOTS))
        read = (REPO.parent / "shared" / "data", default_voc_root(), Path(cache_dir), *write,
                *_env_paths(ENV_DATA_ROOTS))
        return cls(_unique(read), _unique(write))

    def check_read(self, path: str | Path, what: str) -> Path:
        """``path`` resolved, when it lies under a read root; else ``PathRefused`` naming ``what``,
        the path and the roots."""
        return _inside(path, self.read, what, "read", ENV_DATA_ROOTS)

    def check_write(self, path: str | Path, what: str) -> Path:
        """``path`` resolved, when it lies under a write root (``<cache>/exports``,
        ``$ISLE_EXPORT_ROOTS``); else ``PathRefused``."""
        return _inside(path, self.write, what, "written", ENV_EXPORT_ROOTS)

    def check(self, mode: str, path: str | Path, what: str) -> Path:
        """``check_write`` when ``mode`` is ``"write"``, else ``check_read``."""
        return (self.check_write if mode == "write" else self.check_read)(path, what)

    def check_params(self, config: type, params: dict[str, Any], step: str) -> None:
        """Check every non-empty value of ``params`` whose field of the dataclass ``config`` is
        marked ``metadata={"path": "read"}`` (or ``"write"``). Raises ``PathRefused``."""
        for field in dataclasses.fields(config):
            mode = field.metadata.get("path")
            value = params.get(field.name)
            if mode is None or value in (None, ""):
                continue
            self.check(mode, str(value), f"{step}.{field.name}")

    def check_steps(self, steps: Iterable[Step]) -> None:
        """``check_params`` of every step of a chain against its plugin's config; an unknown
        plugin is left to the chain's own checks. Raises ``PathRefused``."""
        for step in steps:
            try:
                plugin = registry.get(step.name)
            except KeyError:
                continue
            self.check_params(plugin.config, step.params, step.name)


def _unique(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(p.resolve() for p in paths))


def _inside(path: str | Path, roots: tuple[Path, ...], what: str, verb: str, env: str) -> Path:
    text = str(path)
    allowed = ", ".join(map(str, roots))
    if ".." in Path(text).parts:
        raise PathRefused(f"{what} {text!r}: refused, '..' is not allowed in a path; use a path under "
                          f"the roots ({allowed})")
    resolved = Path(text).expanduser().resolve()  # follows symlinks: a link out of a root is out
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PathRefused(f"{what} {text!r}: refused, it is not under a folder that may be {verb} "
                          f"({allowed}; more with ${env})")
    return resolved
