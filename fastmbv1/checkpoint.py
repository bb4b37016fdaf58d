"""Saving and loading models: the ``fastmbv1.load`` contract.

A model file is a plain dict of tensors and JSON-able metadata, so it loads with
``torch.load(weights_only=True)`` and never depends on pickled classes of ours:

    {"format": "fastmbv1-model", "version": 1, "model": name, "kwargs": {...},
     "normalization": {"mean": [...], "std": [...]} or None, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastmbv1.errors import UserError, one_line
from fastmbv1.models import build_model

MODEL_FORMAT = "fastmbv1-model"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk at any point leaves the previous file at ``path`` intact.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(
            f"cannot write {path} ({e.strerror or one_line(e)}); any earlier file there is intact"
        ) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def model_info(model: nn.Module, name: str, kwargs: dict) -> dict:
    """Everything of the saved form of ``model`` but its weights: what rebuilds it."""
    norm = getattr(model, "normalize", None)
    normalization = (
        {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
        if hasattr(norm, "mean")
        else None
    )
    return {
        "format": MODEL_FORMAT,
        "version": 1,
        "model": name,
        "kwargs": kwargs,
        "normalization": normalization,
    }


def model_record(model: nn.Module, name: str, kwargs: dict, meta: dict | None = None) -> dict:
    """The saved form of ``model``: what ``load`` needs to rebuild it, and nothing pickled."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {**model_info(model, name, kwargs), "state_dict": state, "meta": meta or {}}


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
        raise UserError(f"checkpoint {path} is unreadable or truncated ({one_line(e)})") from e
    if not isinstance(obj, dict) or "format" not in obj:
        raise UserError(f"{path} is not a fastmbv1 checkpoint")
    return obj


def model_from_record(record: dict, where: str | os.PathLike = "checkpoint") -> nn.Module:
    if record.get("format") != MODEL_FORMAT:
        raise UserError(f"{where} is not a fastmbv1 model file (format {record.get('format')!r})")
    try:
        model = build_model(record["model"], **record["kwargs"])
        model.load_state_dict(record["state_dict"])
    except KeyError as e:
        raise UserError(f"{where} lacks {e} in its model record") from e
    except UserError as e:  # an unknown network, or options its constructor does not take
        raise UserError(f"{where}: {e}") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(
            f"{where} does not match model {record['model']} {record['kwargs']}: {one_line(e)}"
        ) from e
    return model.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """Load a saved model in eval mode: float (N, 3, 32, 32) RGB in [0, 1] -> (N, 10) logits."""
    record = read_checkpoint(path)
    if "model_record" in record:  # a training checkpoint carries its model record inside
        ema = record.get("ema")  # and, with --ema, the average that the run ships
        record = record["model_record"]
        if ema is not None:
            record = {**record, "state_dict": ema["state_dict"]}
    return model_from_record(record, path)


TRAIN_FORMAT = "fastmbv1-train"
CHECKPOINT_GLOB = "checkpoint-*.pt"


def save_training_state(out: Path, state: dict, keep: int) -> Path:
    """Write ``checkpoint-<state["epoch"]>.pt`` atomically, then drop all but the newest
    ``keep``."""
    path = out / f"checkpoint-{state['epoch']:04d}.pt"
    atomic_save({"format": TRAIN_FORMAT, **state}, path)
    for old in sorted(out.glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_training_state(run_dir: str | os.PathLike) -> tuple[dict, Path]:
    """The newest readable training checkpoint in ``run_dir``.

    Saves are atomic, so the newest file is whole unless something outside fastmbv1 damaged
    it; then the one before it is used, with a warning, losing one epoch rather than the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    candidates = sorted(run_dir.glob(CHECKPOINT_GLOB), reverse=True)
    if not candidates:
        raise UserError(f"--resume {run_dir}: no checkpoint-*.pt in it to resume from")
    errors = []
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except UserError as e:
            errors.append(str(e))
            continue
        if state.get("format") != TRAIN_FORMAT:
            errors.append(f"{path} is not a training checkpoint")
            continue
        for e in errors:
            print(f"warning: {e}; using {path.name}", file=sys.stderr)
        return state, path
    raise UserError(f"--resume {run_dir}: no readable checkpoint ({errors[0]})")
