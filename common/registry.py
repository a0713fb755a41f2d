"""Pipelines register themselves by name; heavy code is imported only when a pipeline runs.

A pipeline's ``__init__.py`` calls :func:`register` with import paths (``"pkg.mod:attr"``), so
``lightyard list`` stays fast and a pipeline with a missing optional dependency does not break the
others. Extra pipelines (a user's own, or the tests') are imported from the comma-separated module
names in ``LIGHTYARD_PIPELINES``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any

from common.config import ConfigError


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    module: str  # LightningModule subclass, or a NonGradientExperiment subclass
    datamodule: str | None = None  # LightningDataModule subclass (gradient pipelines)
    config: str | None = None  # config file; default conf/<name>.yaml
    demo_seconds: float = 10.0  # its `lightyard demo` run on one thread of a 2-core CPU, roughly: the longest start first

    def load(self, attr: str) -> Any:
        target = getattr(self, attr)
        if target is None:
            raise ConfigError(f"pipeline '{self.name}' has no {attr} entry point")
        module_name, _, obj = target.partition(":")
        return getattr(importlib.import_module(module_name), obj)


_REGISTRY: dict[str, Pipeline] = {}
_discovered = False


def register(name: str, description: str, module: str, **entry_points: Any) -> Pipeline:
    pipeline = Pipeline(name=name, description=description, module=module, **entry_points)
    _REGISTRY[name] = pipeline
    return pipeline


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import pipelines

    for info in sorted(pkgutil.iter_modules(pipelines.__path__), key=lambda m: m.name):
        if info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"pipelines.{info.name}")
    extras = [m.strip() for m in os.environ.get("LIGHTYARD_PIPELINES", "").split(",") if m.strip()]
    if extras and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: user modules live beside the caller
    for extra in extras:
        try:
            importlib.import_module(extra)
        except ImportError as err:
            raise ConfigError(f"LIGHTYARD_PIPELINES names '{extra}', which does not import: {err}") from None


def all_pipelines() -> list[Pipeline]:
    _discover()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get(name: str) -> Pipeline:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown pipeline '{name}'; registered: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name]
