"""The run folder (``--out``): whether a run may write there, what a restart continues, and
how a session that ended for good says so.

torchrun ``--max-restarts`` starts the same command again after a failure. The restarted
run finds its folder: with a checkpoint it resumes exactly (``--resume auto``), without one
it starts afresh. Exit 3 (interrupted) and 4 (diverged) are not failures to retry, but
torchrun restarts on any status but 0, so such a session leaves ``exit.json`` and a restart
that finds it ends the same way at once.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from fastmbv1.checkpoint import CHECKPOINT_GLOB
from fastmbv1.config import TrainConfig
from fastmbv1.distributed import World
from fastmbv1.errors import Diverged, FastError, Interrupted, UserError
from fastmbv1.metrics import write_json

# Why a session ended with exit 3 or 4, and under which torchrun run.
EXIT_FILE = "exit.json"
RESTART_NEEDS_OUT = (
    "--resume auto and torchrun --max-restarts need --out DIR: a restarted run continues from "
    "the checkpoints there"
)
# What a run writes besides its checkpoints (--overwrite clears them all).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.pt", EXIT_FILE)


def prepare_out(cfg: TrainConfig, resume: str | None, overwrite: bool, write: bool) -> Path:
    out = Path(resume or cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if not write:
        return out
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file")
    if not resume and (out / "config.json").exists() and not overwrite:
        raise UserError(f"output folder {out} already holds a run; pass --overwrite or --resume")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:  # an old run's checkpoints must never pass for this run's
            for old in (*out.glob(CHECKPOINT_GLOB), *(out / n for n in RUN_FILES)):
                old.unlink(missing_ok=True)
        (out / EXIT_FILE).unlink(missing_ok=True)  # this session goes on where that one ended
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {out} is not writable ({e.strerror})") from None
    return out


def refuse_a_finished_schedule(out: Path, budget: float) -> None:
    """Refuse to resume the finished run in ``out`` where its schedule has nothing left to
    train: at any ``budget`` once it ran all its epochs or its budget took the schedule to its
    end, and at a ``budget`` no longer than the one that stopped it. A resume's time takes
    the schedule on from where it was (clock.py); one stopped by --target-acc or a tuner may
    go on."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return  # not finished: its checkpoint says where it goes on from
    ended, spent = summary.get("stopped_by"), summary.get("budget_s", 0.0)
    if ended == "epochs" or (ended == "budget" and (summary.get("progress") or 0.0) >= 1.0):
        raise UserError(
            f"--resume {out}: the run ended with its schedule (stopped by {ended}), so no "
            "--budget leaves it anything to train; final.pt holds it: start a new run"
        )
    if ended == "budget" and budget <= spent:
        raise UserError(
            f"--resume {out}: its --budget of {spent:g} s stopped it; give a larger --budget "
            "to train what is left of its schedule"
        )


def may_restart() -> bool:
    """Whether this worker runs under ``torchrun --max-restarts N`` with N > 0."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0


def auto_resume(out: str | None, restarted: bool) -> str | None:
    """What ``--resume auto`` and a torchrun restart continue: ``out`` when it holds a
    checkpoint, else None, to start that folder afresh (a failure before the first
    checkpoint). ``restarted``: torchrun restarted this worker, so a session that ended with
    exit 3 or 4 is repeated at once."""
    if out is None:
        raise UserError(RESTART_NEEDS_OUT)
    folder = Path(out)
    note = folder / EXIT_FILE
    if restarted and note.is_file():
        ended = json.loads(note.read_text())
        if ended.get("run_id") == os.environ.get("TORCHELASTIC_RUN_ID"):
            error = {3: Interrupted, 4: Diverged}[ended["status"]]
            raise error(f"not restarted: {ended['error']}")
    if (folder / "summary.json").exists():
        raise UserError(f"--out {out} holds a finished run (summary.json): nothing to resume")
    return str(folder) if any(folder.glob(CHECKPOINT_GLOB)) else None


def note_exit(error: FastError, out: Path, world: World) -> FastError:
    """``error`` (interrupted or diverged), noted in ``out`` for a torchrun restart to repeat."""
    if world.main:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        note = {"status": error.exit_status, "error": str(error), "run_id": run_id}
        write_json(out / EXIT_FILE, note)
    return error


def agree_on_the_start(epochs_done: int, out: Path, world: World) -> None:
    """Every rank must start from the same checkpoint (``epochs_done``, -1 for none): after a
    restart each rank looks for one in ``out`` on its own machine."""
    most, least = world.max_over_ranks(epochs_done, -epochs_done)
    if most != -least:
        raise UserError(
            f"ranks found different checkpoints in {out} (after epochs {-least:g} and "
            f"{most:g}; -1: none); every node must see the same --out, on a shared disk"
        )
