"""The one registry of plugins: every method, refinement, ensemble, final training and oracle.

A plugin is a frozen config dataclass plus ``run(cfg, ctx) -> Iterator[LabelResult]``, registered
with ``@register(name, role=..., config=..., title=..., offers=...)`` in one module of
``engine/methods``, ``engine/refine``, ``engine/isle`` or ``engine/final``; the registry imports
those packages on first use, so a new plugin is one new file. The role says where a plugin may
stand in a chain and what it is; ``offers`` says where the app offers it. Pages and the command
line list plugins by role and offer, never by name.

A config field that only changes how a trained model is read out (a threshold, the test scales)
is marked ``inference(default)``; ``training_key`` keeps the others, so variants that differ only
in inference settings share one trained model (``RunContext.model_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cache.classes import ClassSet
from engine.core.types import LabelResult, RunContext

RunFn = Callable[[Any, RunContext], Iterator[LabelResult]]
PLUGIN_PACKAGES = ("engine.methods", "engine.refine", "engine.isle", "engine.final")


class Role(str, Enum):
    """What a plugin is. ``METHOD``, ``ENSEMBLE`` and ``ORACLE`` start a chain; ``REFINEMENT`` and
    ``FINAL`` follow a variant."""

    METHOD = "method"  # image-level labels -> pseudo-labels (WSSS)
    REFINEMENT = "refinement"  # a variant -> a refined variant (dCRF, random walk, SVM)
    ENSEMBLE = "ensemble"  # merges other variants (ISLE); never a default ISLE candidate
    FINAL = "final training"  # trains the final segmentation network on a label set, predicts a split
    ORACLE = "oracle"  # reads the ground truth: an upper bound, never a default ISLE candidate

    @property
    def starts_chain(self) -> bool:
        return self in (Role.METHOD, Role.ENSEMBLE, Role.ORACLE)


class Offer(str, Enum):
    """Where the app offers a plugin."""

    QUEUE = "queue"  # Home's "Queue a method" (chain starters) and every refinement picker
    IMPORT = "import"  # Home's import form (needs a folder)
    ISLE = "isle"  # the ISLE ensemble page (needs an assignment)
    TRAIN = "train"  # the Train page: the network it trains
    LABEL_SET = "label set"  # the Train page: a label set made on demand (the ground truth)


@dataclass(frozen=True)
class Plugin:
    name: str
    role: Role
    config: type
    run: RunFn
    title: str  # how the heatmap names it, e.g. "CAM", "dCRF"
    offers: frozenset[Offer] = frozenset()
    # True when it makes background from a score threshold or trains on a background label, so
    # a class set without background (label 0 a real class) cannot serve it.
    needs_background: bool = False
    # True when its label is its best class score against a background threshold (config fields
    # ``bg_threshold`` and ``class_thresholds``) and its results carry ``LabelResult.peak``: the
    # worker records a threshold sweep, and a variant at another threshold is the same chain
    # with those fields changed (no retraining: both are ``inference`` fields).
    threshold_sweep: bool = False

    def refusal(self, classes: ClassSet) -> str | None:
        """Why this plugin cannot run on a dataset with ``classes``; None when it can."""
        if self.needs_background and not classes.has_background:
            return (f"{self.title} needs a background class (label 0), but this dataset's class set "
                    f"has none ({classes.names[0]!r} is label 0); use a method that does not, e.g. an import")
        return None

    def make_config(self, params: dict[str, Any] | None = None) -> Any:
        """Build the config from a JSON-able dict (lists become tuples).

        Raises ``ValueError`` naming the unknown keys and the valid ones, or the config's own
        ``ValueError`` for a bad value.
        """
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


def register(name: str, *, role: Role, config: type, title: str,
             offers: frozenset[Offer] | set[Offer] = frozenset(),
             needs_background: bool = False, threshold_sweep: bool = False) -> Callable[[RunFn], RunFn]:
    """Decorator adding ``run`` as plugin ``name``; ``ValueError`` when the name is taken, the
    config is not a dataclass, or a ``threshold_sweep`` config lacks its threshold fields."""

    def decorate(run: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise ValueError(f"plugin {name!r} registered twice")
        if not dataclasses.is_dataclass(config):
            raise ValueError(f"plugin {name!r}: config {config!r} is not a dataclass")
        fields = {f.name for f in dataclasses.fields(config)}
        if threshold_sweep and not {"bg_threshold", "class_thresholds"} <= fields:
            raise ValueError(f"plugin {name!r}: a threshold sweep needs config fields bg_threshold and class_thresholds")
        _REGISTRY[name] = Plugin(name, Role(role), config, run, title, frozenset(offers), needs_background,
                                 threshold_sweep)
        return run

    return decorate


@functools.cache
def _load_all() -> None:
    """Import every module of the plugin packages once per process (each registers itself)."""
    for package in PLUGIN_PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(module.__path__):
            importlib.import_module(f"{package}.{info.name}")


def get(name: str) -> Plugin:
    """The plugin called ``name``; ``KeyError`` lists the valid names."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown plugin {name!r}; valid: {sorted(_REGISTRY)}") from None


def plugins(*roles: Role, offer: Offer | None = None) -> list[Plugin]:
    """Registered plugins with one of ``roles`` (all roles when none is given) offered at
    ``offer`` (anywhere when None), in registration order."""
    _load_all()
    return [p for p in _REGISTRY.values()
            if (not roles or p.role in roles) and (offer is None or offer in p.offers)]


def config_to_params(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def inference(default: Any) -> Any:
    """A config field that only changes the read-out of a trained model, not the model."""
    return dataclasses.field(default=default, metadata={"inference": True})


def inference_fields(config: Any) -> tuple[str, ...]:
    """The names of ``config``'s fields marked ``inference``."""
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get("inference"))


def training_key(cfg: Any, *, exclude: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """The settings that make a trained model: every field of ``cfg`` but the ``inference`` ones
    and ``exclude``, plus ``extra`` (e.g. the source variant a refinement trains on). It is the
    key of ``RunContext.model_dir`` and is stored in every checkpoint, so a file written with
    other settings is never reused."""
    dropped = {*inference_fields(cfg), *exclude}
    return {**{k: v for k, v in config_to_params(cfg).items() if k not in dropped}, **extra}
