"""Saving and loading models: the ``fastmbv1.load`` contract.

A model file is a plain dict of tensors and JSON-able metadata, so it loads with
``torch.load(weights_only=True)`` and never depends on pickled classes of ours:

    {"format": "fastmbv1-model", "version": 1, "model": name, "kwargs": {...},
     "normalization": {"mean": [...], "std": [...]} or None, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastmbv1.errors import UserError
from fastmbv1.models import build_model

MODEL_FORMAT = "fastmbv1-model"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk at any point leaves the previous file at ``path`` intact.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_record(model: nn.Module, name: str, kwargs: dict, meta: dict | None = None) -> dict:
    """The saved form of ``model``: what ``load`` needs to rebuild it, and nothing pickled."""
    norm = getattr(model, "normalize", None)
    normalization = (
        {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
        if hasattr(norm, "mean")
        else None
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "model": name,
        "kwargs": kwargs,
        "normalization": normalization,
        "state_dict": state,
        "meta": meta or {},
    }


def save_model(path, model: nn.Module, name: str, kwargs: dict, meta: dict | None = None) -> None:
    atomic_save(model_record(model, name, kwargs, meta), path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True, every failure turned into a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, bad magic ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or truncated ({first[:160]})") from e
    if not isinstance(obj, dict) or "format" not in obj:
        raise UserError(f"{path} is not a fastmbv1 checkpoint")
    return obj


def model_from_record(record: dict, where: str | os.PathLike = "checkpoint") -> nn.Module:
    if record.get("format") != MODEL_FORMAT:
        raise UserError(f"{where} is not a fastmbv1 model file (format {record.get('format')!r})")
    model = build_model(record["model"], **record["kwargs"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{where} does not match model {record['model']} {record['kwargs']}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    return model.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """Load a saved model in eval mode: float (N, 3, 32, 32) RGB in [0, 1] -> (N, 10) logits."""
    record = read_checkpoint(path)
    if "model_record" in record:  # a training checkpoint carries its model record inside
        record = record["model_record"]
    return model_from_record(record, path)
