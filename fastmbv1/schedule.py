"""Learning-rate schedules as a factor of the peak LR.

The run's progress is ``max(steps done / steps planned, seconds used / seconds available)``,
so the same OneCycle anneals to zero at the last planned step or at the edge of the time
budget, whichever comes first: a run cut short by its budget still ends annealed. When the
budget is not binding, progress is the step count alone and the run is deterministic.
"""

from __future__ import annotations

# OneCycle starts at peak / 25, as torch's OneCycleLR does by default.
START_FACTOR = 0.04


def lr_factor(schedule: str, progress: float, epoch: int, *, warmup: float, decay: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "exponential":
        return decay**epoch
    if schedule == "onecycle":
        p = min(max(progress, 0.0), 1.0)
        if p < warmup:
            return START_FACTOR + (1 - START_FACTOR) * p / warmup
        return (1 - p) / (1 - warmup)
    raise ValueError(f"unknown schedule {schedule!r}")
