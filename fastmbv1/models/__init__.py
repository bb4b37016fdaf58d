"""Model registry: choose a network by name, as ``--model NAME`` does on the command line."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from fastmbv1.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    MODELS[fn.__name__] = fn
    return fn


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its constructor arguments ``kwargs``."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


from fastmbv1.models import custom_mobilenet, mobilenet  # noqa: E402,F401  (register models)
