"""Freeze named parameter groups from config (for example the patch embedding of a timm ViT).

A pattern is a module path at any depth (``patch_embed`` freezes ``backbone.patch_embed.*``) or an fnmatch glob over
parameter names (``stages.0.*``). Frozen parameters get ``requires_grad=False``, so autograd gives
them no gradient and optimizers built from :func:`trainable_parameters` keep no state for them.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase
from typing import Iterable

import torch

from common.config import ConfigError

log = logging.getLogger(__name__)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Does parameter ``name`` fall under one of ``patterns`` (module path or glob)?"""
    return any(_matches(name, pattern) for pattern in patterns)


def _matches(name: str, pattern: str) -> bool:
    """A module path at any depth (``patch_embed`` matches ``backbone.patch_embed.proj.weight``), or a glob."""
    return f".{pattern}." in f".{name}." or fnmatchcase(name, pattern)


def freeze(model: torch.nn.Module, patterns: Iterable[str]) -> list[str]:
    """Freeze every parameter matching one of ``patterns``; return the frozen names in order."""
    patterns = list(patterns)
    check_patterns([name for name, _ in model.named_parameters()], patterns)
    frozen = []
    for name, param in model.named_parameters():
        if any(_matches(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def check_patterns(names: list[str], patterns: list[str]) -> None:
    """Each pattern matches a parameter, or one line listing the modules there are."""
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in names):
            top = sorted({name.split(".")[0] for name in names})
            second = sorted({".".join(name.split(".")[:2]) for name in names if name.count(".") >= 2})
            more = f" (inside: {', '.join(second[:12])}{', …' if len(second) > 12 else ''})" if second else ""
            raise ConfigError(f"freeze pattern '{pattern}' matches no parameter; top-level modules: {', '.join(top)}{more}")


def check_before_run(module_cls, cfg) -> None:
    """``freeze=[…]`` against the parameter names before a run opens, from the module built on the meta device (no
    memory, no initialisation), or from its ``skeleton(cfg)`` where it builds its network in ``setup`` from the data's
    sizes (the network with placeholder sizes: the names do not depend on them). Best effort: where neither gives
    names, the patterns are checked when the model is built (:func:`freeze_when_built`)."""
    patterns = list(cfg.get("freeze") or [])
    if not patterns:
        return
    if not issubclass(module_cls, torch.nn.Module):  # a NonGradientExperiment: the runner trains nothing it could freeze
        raise ConfigError(
            f"freeze={patterns} does not apply: {cfg.pipeline} is not trained by the Lightning runner (its experiment builds its own models)"
        )
    skeleton = getattr(module_cls, "skeleton", None)
    try:
        with torch.device("meta"):
            model = skeleton(cfg) if skeleton else module_cls(cfg)
    except (RuntimeError, NotImplementedError, OSError) as err:  # needs real tensors or files: checked when built
        log.debug("freeze patterns not checked before the run (%s: %s); checked when the model is built", type(err).__name__, err)
        return
    names = [name for name, _ in model.named_parameters()]
    if not names and skeleton:
        raise ConfigError(f"freeze={patterns} does not apply: {cfg.pipeline} has no parameters trained by gradient")
    if names:
        check_patterns(names, patterns)
        if all(matches(name, patterns) for name in names):  # (the optimiser would say "empty parameter list" mid-setup)
            raise ConfigError(
                f"freeze={patterns} freezes every parameter of {cfg.pipeline}: nothing would train; freeze a part of the model"
            )


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def freeze_when_built(module, patterns: Iterable[str]) -> None:
    """Apply ``freeze=[…]`` to a LightningModule once its layers exist and before the strategy wraps it.

    Some modules build their network in ``setup`` (its sizes come from the data), which Lightning calls after the
    callbacks' ``setup``; ``configure_model`` runs after both and before DDP wraps the model, so frozen parameters
    are never registered for gradient reduction. The module's own ``configure_model`` still runs first.
    """
    patterns = list(patterns)
    if not patterns:
        return
    build = module.configure_model

    def configure_model() -> None:
        build()
        freeze(module, patterns)

    module.configure_model = configure_model
