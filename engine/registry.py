"""The one registry of pseudo-label methods and refinements.

A plugin is a frozen config dataclass plus ``run(cfg, ctx) -> Iterator[LabelResult]``; adding one
is one module under ``engine/methods/`` or ``engine/refine/`` that calls ``@register``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from engine.types import LabelResult, RunContext

Kind = Literal["method", "refine"]
RunFn = Callable[[Any, RunContext], Iterator[LabelResult]]


@dataclass(frozen=True)
class Plugin:
    name: str
    kind: Kind
    config: type
    run: RunFn
    title: str  # how the heatmap names it, e.g. "CAM", "dCRF"
    oracle: bool = False  # reads the ground truth: an upper bound, never a default ISLE candidate

    def make_config(self, params: dict[str, Any] | None = None) -> Any:
        """Build the config from a JSON-able dict; unknown keys raise ``ValueError``."""
        params = dict(params or {})
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; valid: {sorted(names)}")
        for f in dataclasses.fields(self.config):
            if f.name in params and isinstance(params[f.name], list):
                params[f.name] = tuple(params[f.name])
        return self.config(**params)


_REGISTRY: dict[str, Plugin] = {}


def register(name: str, *, kind: Kind, config: type, title: str, oracle: bool = False) -> Callable[[RunFn], RunFn]:
    def decorate(run: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise ValueError(f"plugin {name!r} registered twice")
        _REGISTRY[name] = Plugin(name, kind, config, run, title, oracle)
        return run

    return decorate


def _load_all() -> None:
    for package in ("engine.methods", "engine.refine"):
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"{package}.{info.name}")


def get(name: str) -> Plugin:
    """The plugin called ``name``; ``KeyError`` lists the valid names."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method or refinement {name!r}; valid: {sorted(_REGISTRY)}") from None


def plugins(kind: Kind | None = None) -> list[Plugin]:
    _load_all()
    return [p for p in _REGISTRY.values() if kind is None or p.kind == kind]


def config_to_params(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
