"""The model registry: networks by name, as ``--model NAME`` chooses them.

Its own module, below the model files: each model file registers itself here, and
``fastmbv1.models`` imports the model files, so nothing imports its own importer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

from fastmbv1.errors import UserError

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(
    fn: Callable[..., nn.Module], name: str | None = None
) -> Callable[..., nn.Module]:
    """Register a network's constructor, a class or a function, as ``name`` (else its own)."""
    MODELS[name or fn.__name__] = fn
    return fn


def takes(name: str, option: str) -> bool:
    """Whether the network registered as ``name`` takes the keyword argument ``option``."""
    params = inspect.signature(MODELS[name]).parameters.values()
    return any(p.name == option or p.kind is p.VAR_KEYWORD for p in params)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with its constructor arguments ``kwargs``."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    try:  # the signature only: a TypeError inside the constructor is a bug, not the user's
        inspect.signature(MODELS[name]).bind(**kwargs)
    except TypeError as e:  # e.g. a saved record or a flag naming an option it does not have
        raise UserError(f"model {name!r} cannot be built with these options: {e}") from None
    return MODELS[name](**kwargs)
