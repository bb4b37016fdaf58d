"""SIGINT and SIGTERM: the flag the training loop checks, and what a signal leaves time for.

The first signal asks the loop to stop after the step it is in; the run saves a checkpoint
and exits with status 3. A preempted job gets a short grace before SIGKILL, so the
checkpoint is written first; an evaluation then due follows only if it fits.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastmbv1.clock import BudgetClock
from fastmbv1.distributed import World
from fastmbv1.errors import Interrupted

# Seconds between SIGTERM and SIGKILL that a preempted job can count on (the default of
# Kubernetes, of SLURM's KillWait and of torchrun's --shutdown-timeout).
SIGNAL_GRACE_S = 30.0


class Signals:
    """The first SIGINT/SIGTERM a run received (by name) and when (monotonic), if any."""

    received: str | None = None
    at: float | None = None


@contextmanager
def graceful_interrupts() -> Iterator[Signals]:
    """First SIGINT/SIGTERM: ask the loop to stop after this step. Second SIGINT: stop now."""
    signals = Signals()

    def handler(signum, frame):
        if signals.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        signals.received = signal.Signals(signum).name
        signals.at = signals.at or time.monotonic()
        print(
            f"\n{signals.received}: finishing this step and saving a checkpoint "
            "(SIGINT again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    # Signal handlers can only be set from the main thread (not, say, inside a tuner thread).
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield signals
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def time_to_evaluate(
    signals: Signals, clock: BudgetClock, world: World, saved: Path | None, save_start: float
) -> bool:
    """After a signal and the checkpoint begun at ``save_start`` (``time.perf_counter``):
    whether the evaluation then due, and a second save, still fit within SIGNAL_GRACE_S of
    the signal and within the budget. Ranks agree, as the evaluation is a collective."""
    save_s = time.perf_counter() - save_start
    since = time.monotonic() - (signals.at or time.monotonic())
    need = clock.eval_reserve() + save_s
    late = since + need > SIGNAL_GRACE_S or clock.wall() + need > clock.budget
    (late,) = world.max_over_ranks(late)
    if world.main:
        then = f"no time to evaluate (about {need:.1f} s)" if late else "evaluating, then saving"
        print(f"{signals.received}: saved {saved} {since:.1f} s after it; {then}", file=sys.stderr)
    return not late


def interrupted(signals: Signals, saved: Path | None, out: Path, when: str) -> Interrupted:
    return Interrupted(
        f"{signals.received} {when}; saved {saved}; continue with: fastmbv1 train --resume {out}"
    )
