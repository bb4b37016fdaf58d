"""The networks, by name: importing this package registers every model file's models."""

from fastmbv1.models import custom_mobilenet, mobilenet  # noqa: F401  (they register themselves)
from fastmbv1.models.registry import MODELS, build_model, register_model, takes

__all__ = ["MODELS", "build_model", "register_model", "takes"]
