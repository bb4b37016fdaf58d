"""The budget clock: how far a run is through its schedule, and when it must stop.

``--budget`` is wall-clock time for the whole run: loading, compiling, training, every
evaluation and the final save. Before each step the clock answers one question: the
schedule's progress in [0, 1], where 1 means "stop now". Progress is the step count over the
planned steps while they fit into the time left; once they no longer fit (and from then on,
so the LR never jumps back) it is the larger of that and the time used over the time
available, which anneals a budget-cut run to the end of its schedule. So a run that fits its
budget is step-driven and repeats exactly, and one that does not still ends annealed (as
does a run whose epochs the budget chose: ``plan.PLAN_MARGIN`` plans more than fit).
A resumed run's time takes the schedule on from the progress it had reached, so a resume
with a larger budget stretches what was left rather than sending the LR back up.

The time available keeps back a reserve for the final evaluation (as measured at the last
evaluation, or guessed from the training speed before the first) and for the save. Training
stops one step before the budget would be overrun.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds kept free at the end of a budget for writing final.pt and summary.json.
SAVE_RESERVE_S = 1.0
# Weight of the newest step in the running step-time estimate.
STEP_SMOOTHING = 0.2


class BudgetClock:
    """Wall clock, step-time estimate, evaluation reserve, and the progress-and-stop rule.

    ``eval_steps``: until an evaluation has been measured, assume it takes this many training
    steps (train.py: the plan's estimate, a share of a training image per view of a test image).
    ``elapsed``: seconds a resumed run had already used. ``start``: when this session's time
    began, as ``now`` read it (default: now). ``lag``: steps between a decision and the step
    it governs (ranks act on what they agreed one step late), which the stop rule looks
    ahead by. ``time_driven``: the run was already time-driven (a resumed one).
    ``resumed_progress``: the schedule's progress a resumed run had reached (``resume_point``
    when it was saved), which its time left then takes to 1: so a resume with a larger
    budget stretches what is left of the schedule rather than sending the LR back up (None:
    a fresh run). ``now``: the time source (a fake one in tests).
    """

    def __init__(
        self,
        budget: float,
        total_steps: int,
        *,
        eval_steps: float,
        elapsed: float = 0.0,
        start: float | None = None,
        lag: int = 0,
        time_driven: bool = False,
        resumed_progress: float | None = None,
        now: Callable[[], float] = time.perf_counter,
    ):
        self.budget, self.total_steps, self.eval_steps = budget, total_steps, eval_steps
        self.lag = lag
        self.now, self.elapsed = now, elapsed
        self.start = now() if start is None else start
        self.step_s = 0.0  # running estimate of one step's wall time
        self.eval_s: float | None = None  # the last evaluation's measured seconds
        self.time_driven, self.resumed_progress = time_driven, resumed_progress
        self.reached = 0.0  # the progress last answered, which resume_point starts from
        self.steps_seen = 0  # steps timed by this clock: the first ones compile and warm up
        self.timed_s, self.timed_steps = 0.0, 0  # the steps after those: their mean
        self.last_tick: float | None = None

    def wall(self) -> float:
        """Seconds of the budget used so far (a resumed run's earlier time included)."""
        return self.elapsed + self.now() - self.start

    def eval_reserve(self) -> float:
        """The final evaluation's seconds: as last measured, or before that ``eval_steps`` at
        the mean step time. Not the running estimate: the reserve multiplies it by tens of
        steps, so one stall of a shared machine in it stopped a plain 150 s run 48 s in, mid
        warm-up (2026-12-07); and on a GPU, where the host runs steps ahead and one step
        waits for the rest, only a mean over many steps is right."""
        if self.eval_s is not None:
            return self.eval_s
        if not self.timed_steps:  # nothing timed yet: nothing to price it at
            return 0.0
        return self.eval_steps * self.timed_s / self.timed_steps

    def available(self) -> float:
        """Seconds of the budget that training may use: the rest is the final eval and save."""
        return self.budget - self.eval_reserve() - SAVE_RESERVE_S

    def measured_eval(self, seconds: float) -> None:
        self.eval_s = seconds

    def new_epoch(self) -> None:
        """The gap since the last step (evaluation, checkpoint) is not a step's time."""
        self.last_tick = None

    def progress(self, step: int) -> float:
        """Called before step ``step`` (0-based) runs: its schedule progress; >= 1 means stop."""
        now = self.wall()
        # The first two steps a clock sees compile and warm up: they say nothing of the rest.
        if self.last_tick is not None and self.steps_seen >= 2:
            took = now - self.last_tick
            self.step_s = (
                took
                if self.step_s == 0
                else ((1 - STEP_SMOOTHING) * self.step_s + STEP_SMOOTHING * took)
            )
            self.timed_s += took
            self.timed_steps += 1
        self.last_tick = now
        self.steps_seen += 1
        limit = self.available()
        self.time_driven = self.time_driven or now + self.step_s * (self.total_steps - step) > limit
        progress = step / self.total_steps
        if self.time_driven:
            progress = max(progress, self.by_time(now + self.step_s * (1 + self.lag), limit))
        self.reached = min(progress, 1.0)  # beyond 1 only says how overdue the stop is
        return progress

    def by_time(self, wall: float, limit: float) -> float:
        """Progress by time at ``wall`` seconds of the budget, in proportion: from 0 at the
        run's start, or a resumed run's progress at its ``elapsed`` seconds, to 1 at ``limit``."""
        if self.resumed_progress is None:
            return wall / max(limit, 1e-9)
        left = max(limit - self.elapsed, 1e-9)
        return self.resumed_progress + (1 - self.resumed_progress) * (wall - self.elapsed) / left

    def resume_point(self) -> float:
        """The progress a run saved now goes on from: the last step's, or once time drives,
        what the time used since says too (an evaluation or a save uses the schedule's time)."""
        if not self.time_driven:
            return self.reached
        return min(1.0, max(self.reached, self.by_time(self.wall(), self.available())))

    def fits_a_step(self, after: float = 0.0) -> bool:
        """Whether one more step would still fit if ``after`` seconds were spent first."""
        return self.wall() + after + self.step_s < self.available()
