"""timm models from config, with the errors a user can cause (a misspelt name, kwargs the model does not take)
said in one line."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.config import ConfigError


def unknown_model(name: str) -> ConfigError:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ConfigError(f"unknown timm model '{name}'; {hint}list them with: python -c \"import timm; print(timm.list_models('*vit*'))\"")


def check_timm_name(name: str) -> None:
    """A timm model name, checked before a run opens (``timm.is_model``: nothing is built)."""
    import timm

    if not timm.is_model(name):
        raise unknown_model(name)


def create_timm_model(name: str, key: str = "model.kwargs", **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; an unknown name or unfitting kwargs is a :class:`ConfigError` naming ``key``."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        if "Unknown model" in str(err):
            raise unknown_model(name) from None
        if "must be non-negative" not in str(err):  # (a negative depth: torch.linspace's steps)
            raise
        raise ConfigError(f"{key} do not fit {name}: {err}") from None
    except (TypeError, AssertionError, ValueError, ZeroDivisionError) as err:  # a keyword it does not take; a value it cannot use
        raise ConfigError(f"{key} do not fit {name}: {str(err) or type(err).__name__}") from None
