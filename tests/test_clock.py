"""The budget clock on a fake time source: when the schedule turns to time, when it stops."""

import pytest

from fastmbv1.clock import SAVE_RESERVE_S, BudgetClock


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run_steps(clock: BudgetClock, time: FakeTime, seconds: list[float]) -> list[float]:
    """Ask for each step's progress, then let the step take its seconds; stop at progress 1."""
    progress = []
    for step, took in enumerate(seconds):
        p = clock.progress(step)
        if p >= 1.0:
            break
        progress.append(p)
        time.t += took
    return progress


def test_step_driven_while_the_planned_steps_fit():
    time = FakeTime()
    clock = BudgetClock(100.0, 10, eval_steps=2, now=time)
    progress = run_steps(clock, time, [1.0] * 10)
    assert progress == [s / 10 for s in range(10)]
    assert not clock.time_driven


def test_time_drives_once_the_steps_no_longer_fit_and_never_lets_go():
    time = FakeTime()
    clock = BudgetClock(20.0, 100, eval_steps=0, now=time)
    # Slow steps first: 100 of them cannot fit into 20 s.
    progress = run_steps(clock, time, [1.0] * 5 + [0.01] * 95)
    limit = 20 - SAVE_RESERVE_S
    assert progress[4] == pytest.approx((4 + 1) / limit)  # (time now + one step) / limit
    # The 95 fast steps would fit again, but the schedule stays on time: it never falls back
    # to the step count, which would send the LR back up the warm-up.
    assert clock.time_driven
    assert all(p >= (5 + 0.01 * i) / limit for i, p in enumerate(progress[5:]))


def test_one_stall_does_not_end_the_run():
    time = FakeTime()
    # 400 steps of 0.25 s and a reserve of 62.5 steps fit 150 s with room for one 10 s stall.
    clock = BudgetClock(150.0, 400, eval_steps=62.5, now=time)
    progress = run_steps(clock, time, [0.25] * 150 + [10.0] + [0.25] * 249)
    assert len(progress) == 400 and time.t == pytest.approx(109.75)


def test_the_reserve_prices_the_mean_step_of_a_bursty_gpu():
    time = FakeTime()
    # The host runs ahead of the GPU and every 25th step waits for the rest: 10 ms a step.
    clock = BudgetClock(1000.0, 10_000, eval_steps=100, now=time)
    run_steps(clock, time, ([0.001] * 24 + [0.226]) * 40 + [0.001] * 2)
    assert clock.eval_reserve() == pytest.approx(100 * 0.01, rel=0.05)


def test_stops_one_step_before_the_budget_keeping_the_reserve():
    time = FakeTime()
    clock = BudgetClock(50.0, 1000, eval_steps=0, now=time)
    clock.measured_eval(5.0)
    run_steps(clock, time, [1.0] * 1000)
    available = 50.0 - 5.0 - SAVE_RESERVE_S
    # Every step that ran ended inside the time left for training, and one more would not.
    assert time.t <= available
    assert time.t + clock.step_s >= available
    assert not clock.fits_a_step()


def test_the_reserve_is_a_guess_until_an_evaluation_is_measured():
    time = FakeTime()
    clock = BudgetClock(1000.0, 100, eval_steps=8, now=time)
    run_steps(clock, time, [0.5] * 10)
    assert clock.eval_reserve() == pytest.approx(8 * 0.5)  # the test set at training speed
    clock.measured_eval(3.0)
    assert clock.eval_reserve() == 3.0
    assert clock.available() == pytest.approx(1000.0 - 3.0 - SAVE_RESERVE_S)


def test_compiling_first_step_and_evaluation_gaps_are_not_step_time():
    time = FakeTime()
    clock = BudgetClock(1000.0, 100, eval_steps=0, now=time)
    run_steps(clock, time, [30.0] + [1.0] * 9)  # the first step compiles
    assert clock.step_s == pytest.approx(1.0)
    time.t += 20.0  # an evaluation and a checkpoint between epochs
    clock.new_epoch()
    clock.progress(10)
    time.t += 1.0
    clock.progress(11)
    assert clock.step_s == pytest.approx(1.0)


def test_a_resumed_time_driven_run_goes_on_by_time_from_its_first_step():
    time = FakeTime()
    # 60 s of 100 used, at step 300 of 1,000 planned: by time the schedule is at 0.6.
    resumed = BudgetClock(100.0, 1000, eval_steps=0, elapsed=60.0, time_driven=True, now=time)
    assert resumed.progress(300) == pytest.approx(60 / (100 - SAVE_RESERVE_S))
    fresh = BudgetClock(100.0, 1000, eval_steps=0, elapsed=60.0, now=time)
    assert fresh.progress(300) == pytest.approx(0.3)  # what a resume did: the LR back up


def test_a_resume_with_a_larger_budget_stretches_what_is_left_of_the_schedule():
    time = FakeTime()
    # 60 s used of --budget 100, at progress 0.6; resumed with --budget 200.
    clock = BudgetClock(
        200.0, 1000, eval_steps=0, elapsed=60.0, time_driven=True, resumed_progress=0.6, now=time
    )
    assert clock.progress(300) == pytest.approx(0.6)  # on from there: not back to 60 / 199
    time.t = (200 - SAVE_RESERVE_S - 60) / 2
    assert clock.progress(301) == pytest.approx(0.8)  # half the time left: half the rest


def test_saved_and_resumed_with_its_budget_a_run_goes_on_as_it_would_have():
    time = FakeTime()
    clock = BudgetClock(100.0, 1000, eval_steps=0, time_driven=True, now=time)
    clock.progress(0)
    time.t = 60.0  # its last step, an evaluation and a save: they use the schedule's time too
    saved = clock.resume_point()
    assert saved == pytest.approx(60 / (100 - SAVE_RESERVE_S))
    later = FakeTime()
    resumed = BudgetClock(
        100.0, 1000, eval_steps=0, elapsed=60.0, time_driven=True, resumed_progress=saved,
        now=later,
    )  # fmt: skip
    later.t = 20.0
    assert resumed.progress(300) == pytest.approx(80 / (100 - SAVE_RESERVE_S))


def test_a_resumed_run_counts_its_earlier_time():
    time = FakeTime()
    clock = BudgetClock(100.0, 10, eval_steps=0, elapsed=40.0, now=time)
    time.t = 5.0
    assert clock.wall() == 45.0
    assert clock.fits_a_step(after=50.0)
    assert not clock.fits_a_step(after=60.0)
