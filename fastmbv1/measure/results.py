"""What a bench gives back: a table of rows measured one by one, and the document that
``--save`` writes, which holds the command, the machine, the versions and the rows."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fastmbv1.errors import UserError
from fastmbv1.machine import device_name, versions
from fastmbv1.tables import Column

RESULTS_DIR = "bench/results"


@dataclass
class Table:
    columns: list[Column]
    rows: Iterable[dict]  # measured lazily: each row prints as soon as it exists
    footer: Callable[[list[dict]], str] | None = None
    details: Callable[[dict], str | None] | None = None  # printed after the table, per row
    saved_as: str | None = None  # what --save names the file for, if not this machine


def document(command: str, device, rows: list[dict]) -> dict:
    """What a saved result file holds: the command, where it ran, with what, and the rows."""
    return {
        "command": command,
        "machine": device_name(device),
        "device": str(device),
        "versions": versions(),
        "results": rows,
    }


def write_document(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror})") from None
    return path


def result_path(results_dir: str | Path, what: str, machine: str) -> Path:
    return (
        Path(results_dir) / f"{what}-{re.sub(r'[^a-z0-9]+', '-', machine.lower()).strip('-')}.json"
    )
