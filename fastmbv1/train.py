"""The training loop: one run of ``fastmbv1 train``, from config to ``final.pt``.

``train`` reads top to bottom: resolve the config for this machine, load the data, build the
run (``fastmbv1.step``), resume; then for each epoch train it, evaluate when due, log,
checkpoint and decide whether to stop; then the final evaluation and save. The budget clock
(``fastmbv1.clock``) decides how far the schedule is and when time is up.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from fastmbv1 import augment, distributed
from fastmbv1.checkpoint import (
    latest_training_state,
    model_from_record,
    save_model,
    save_training_state,
)
from fastmbv1.clock import BudgetClock
from fastmbv1.compile_cache import CompileCache
from fastmbv1.config import WHY, TrainConfig
from fastmbv1.distributed import Agreement, World, split_batch
from fastmbv1.errors import Diverged
from fastmbv1.evaluate import evaluate
from fastmbv1.flops import training_flops_per_image
from fastmbv1.interrupts import Signals, graceful_interrupts, interrupted, time_to_evaluate
from fastmbv1.machine import device_name, peak_memory, pick_device, sync, versions
from fastmbv1.metrics import RunLog, format_summary, utilisation, write_json
from fastmbv1.peak import cached_peak, step_dtype
from fastmbv1.plan import eval_cost, plan_run
from fastmbv1.profile import StepTrace
from fastmbv1.rundir import agree_on_the_start, note_exit, prepare_out, refuse_a_finished_schedule
from fastmbv1.schedule import lr_factor
from fastmbv1.state import RunState, Totals
from fastmbv1.step import Run, build_run, set_lr, train_step
from fastmbv1.timing import ComputeTimer
from pipelines import Pipeline

# By default evaluations take at most this share of the time (one more always ends a run).
EVAL_SHARE = 0.02
# Without a GPU, checking the loss every step is free; on CUDA it would sync each step.
NAN_CHECK_EVERY = {"cpu": 1, "cuda": 25}
# Without --checkpoint-every, a run whose first epoch took longer than this many seconds of
# training saves a checkpoint after every epoch (a crash would lose more than it costs).
AUTO_CHECKPOINT_EPOCH_S = 60.0


@dataclass
class Epoch:
    """What one pass over the training batches did; ``stop`` says why it ended early."""

    steps: int
    images: int
    losses: torch.Tensor  # one per step, on the device
    correct: int
    lr: float
    data_wait_s: float
    train_s: float
    compile_s: float  # the run's first step and warm-up, when it compiled
    skipped_steps: int  # fp16 steps the grad scaler skipped
    stop: str | None  # "budget", "signal" or "diverged"
    note: str = ""  # what diverged, and where
    compute_s: float = 0.0  # augmenting and stepping, device time (ComputeTimer), compile not
    side: int = augment.FULL_SIDE  # the images' side this epoch (progressive resizing)


def agreed(rows: list[list[float]]) -> tuple[float, bool, tuple[int, int, float] | None]:
    """What every rank acts on, from each rank's row [progress, signalled, step of its first
    non-finite loss or -1, that loss]: the furthest progress, whether any rank was signalled,
    and the first non-finite loss as (step, rank, loss), the lowest rank's on a tie."""
    bad = [(int(r[2]), rank, r[3]) for rank, r in enumerate(rows) if r[2] >= 0]
    return max(r[0] for r in rows), any(r[1] for r in rows), min(bad, default=None)


def train_epoch(
    run: Run,
    batches: Pipeline,
    clock: BudgetClock,
    agreement: Agreement,
    signals: Signals,
    log: RunLog,
    totals: Totals,
    warm_up: Callable[[], None] | None = None,
    trace: StepTrace | None = None,
) -> Epoch:
    """Train the epoch after ``totals.epochs_done``, until the clock or a signal stops it.

    Before each step the ranks agree (``agreement``, one step late) on the schedule's
    progress, signals and non-finite losses, so all take the same LR and stop at the same
    step; a last exchange after the epoch's last step settles how that step went.
    ``warm_up`` runs after the run's very first step (a compiled run compiles more there);
    ``trace`` records the epoch's first ``trace.steps`` steps.
    """
    cfg, device = run.cfg, run.device
    epoch, first_step, n = totals.epochs_done, totals.steps, len(batches)
    # A host generator: mixing draws its scalars without a GPU sync (see fastmbv1.augment).
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    losses = torch.zeros(n, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    nan_every = NAN_CHECK_EVERY.get(device.type, 1)
    lrs, images, data_wait, compile_s, stop, note = [], 0, 0.0, 0.0, None, ""
    bad = (-1.0, 0.0)  # this rank's first non-finite loss: (step, loss), or none yet
    side, compute = augment.FULL_SIDE, ComputeTimer(device)
    clock.new_epoch()
    bar = log.bar(epoch + 1, n)
    start = time.perf_counter()
    it = iter(batches)
    for i in range(n + 1):
        step = first_step + i
        mine = [clock.progress(step) if i < n else 0.0, bool(signals.received), *bad]
        progress, signalled, diverged = agreed(agreement.exchange(mine, now=i == n))
        if diverged is not None:
            at, rank, loss = diverged
            where = f" on rank {rank}" if agreement.world.active else ""
            stop, note = (
                "diverged",
                (
                    f"loss became {loss} at step {at + 1}{where} (epoch {epoch + 1}, lr "
                    f"{lrs[at - first_step]:.4g}); lower --lr or use --amp bf16/off; the last "
                    f"checkpoint in {log.path.parent} is from before it"
                ),
            )
            break
        # Agreed one step late, progress misses this step's own share of the schedule.
        progress = max(progress, step / clock.total_steps)
        if signalled or (i < n and progress >= 1.0):
            stop = "signal" if signalled else "budget"
            signals.received = signals.received or "a signal on another rank"
            break
        if i == n:
            break
        if i == 0:  # progressive resizing: one image side for the whole epoch
            side = augment.side_at(cfg.start_side, progress)
        if trace is not None and i == 0:
            trace.start()
        elif trace is not None and i == trace.steps and trace.running:
            trace.report()
        lrs.append(
            cfg.lr * lr_factor(cfg.schedule, progress, epoch, warmup=cfg.warmup, decay=cfg.lr_decay)
        )
        set_lr(run, lrs[-1])
        t = time.perf_counter()
        with record_function("data wait"):
            x, y = next(it)
        data_wait += time.perf_counter() - t
        compute.start()
        with record_function("augment"):
            x, y_a, y_b, lam = augment.augment_batch(x, y, cfg, gen, side)
        t = time.perf_counter()
        losses[i], hits = train_step(run, x, y_a, y_b, lam)
        compute.stop()
        correct += hits
        images += len(y)
        if step == 0 and warm_up is not None:
            warm_up()
            sync(device)
            compile_s = time.perf_counter() - t
            compute.forget_last()
        if bad[0] < 0 and ((i + 1) % nan_every == 0 or i + 1 == n):
            lo = max(0, i + 1 - nan_every)
            found = (~torch.isfinite(losses[lo : i + 1])).nonzero()
            if len(found):  # told to every rank by the next exchanges; all stop at one step
                j = lo + int(found[0])
                bad = (first_step + j, losses[j].item())
        bar.update()
        if log.interactive and i % 20 == 0:  # .item() syncs a GPU: not every step
            bar.set_postfix(
                loss=f"{losses[i].item():.3f}", budget_left=f"{cfg.budget - clock.wall():.0f}s"
            )
    bar.close()
    agreement.finish()  # an exchange still in flight when the ranks agreed to stop early
    if trace is not None and trace.running:  # the epoch ended before its steps were recorded
        trace.steps = len(lrs)
        trace.report()
    steps = len(lrs)
    sync(device)
    skipped = int(run.skipped_steps) if run.scaler.is_enabled() else 0  # once an epoch
    run.skipped_steps.zero_()
    return Epoch(
        steps=steps,
        images=images,
        losses=losses[:steps],
        correct=int(correct),
        lr=lrs[-1] if lrs else 0.0,
        data_wait_s=data_wait,
        train_s=time.perf_counter() - start,
        compile_s=compile_s,
        skipped_steps=skipped,
        stop=stop,
        note=note,
        compute_s=compute.seconds(),
        side=side,
    )


def evaluate_run(
    run: Run, batches: Pipeline, world: World, clock: BudgetClock, totals: Totals
) -> tuple[float, float]:
    """Test accuracy (percent) of the model as it is saved, and the seconds it took (told to
    the clock and counted). Each rank scores its own slice of the test set and the counts
    are summed, so the accuracy is exact."""
    start = time.perf_counter()
    world.share_buffers(run.shipped)
    with record_function("evaluation"):
        counts = evaluate(
            run.model_for_eval, batches, run.device, run.cfg.amp, run.cfg.channels_last
        )
    correct, total = world.sum(list(counts), run.device)
    seconds = time.perf_counter() - start
    clock.measured_eval(seconds)
    totals.eval_s += seconds
    return 100.0 * correct / total, seconds


def starting_model(
    cfg: TrainConfig, state: RunState | None, model: nn.Module | None, kwargs: dict | None
) -> dict:
    """``build_run``'s model arguments: the resumed run's, the given one, or a fresh one."""
    if state is not None:
        record = state.model_record
        return dict(model=model_from_record(record), name=record["model"], kwargs=record["kwargs"])
    if model is not None:
        return dict(model=model, name=cfg.model, kwargs=kwargs or {})
    return {}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def end_of_epoch(
    e: Epoch, cfg: TrainConfig, totals: Totals, clock: BudgetClock, world: World, signals: Signals
) -> tuple[str | None, bool]:
    """Whether the epoch just trained is the last (and why), and whether to evaluate it.

    Decided before evaluating, so the last epoch is always evaluated: when the next step
    would not fit after this epoch's evaluation, the run stops here. Ranks agree on both.
    """
    if cfg.eval_every:
        due = totals.epochs_done % cfg.eval_every == 0
    else:  # as often as keeps the evaluations within EVAL_SHARE of the time used
        due = totals.eval_s + clock.eval_reserve() <= EVAL_SHARE * clock.wall()
    no_room = not clock.fits_a_step(after=clock.eval_reserve() if due else 0.0)
    # Every rank must make the same choice: an evaluation is a collective operation.
    no_room, signalled, due = world.max_over_ranks(no_room, bool(signals.received), due)
    if signalled:  # a signal during the epoch's last step, here or on another rank
        signals.received = signals.received or "a signal on another rank"
    stop = e.stop or ("signal" if signalled else None)
    if stop is None and totals.epochs_done == cfg.epochs:
        stop = "epochs"
    if stop is None and no_room:
        stop = "budget"
    return stop, bool(due) or stop is not None


def epoch_record(
    e: Epoch, totals: Totals, test_acc: float | None, eval_s: float, world: World, steps: int
) -> dict:
    """One line of metrics.jsonl; ``steps``: the steps of a complete epoch."""
    return {
        "epoch": totals.epochs_done,
        "step": totals.steps,
        "lr": e.lr,
        "train_loss": float(e.losses.mean()) if e.steps else None,
        "train_acc": 100.0 * e.correct / max(e.images, 1),
        "test_acc": test_acc,
        "train_s": e.train_s,
        "train_s_total": totals.train_s,
        "eval_s": eval_s,
        "eval_s_total": totals.eval_s,
        "wall_s": totals.wall_s,
        "data_wait_s": e.data_wait_s,
        "images_per_s": e.images * world.size / max(e.train_s, 1e-9),  # all ranks
        "complete": e.steps == steps,
    }


@dataclass
class RunResult:
    summary: dict
    model: nn.Module  # the network as saved (not a compiled wrapper), in eval mode
    out: Path


def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    model_kwargs: dict | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    on_epoch: Callable[[dict], bool | None] | None = None,
) -> RunResult:
    """Run one training job; its summary is also written to summary.json.

    ``model``/``model_kwargs`` start from a given network (pruning fine-tunes this way);
    ``resume`` continues the run in that folder from its newest checkpoint; ``on_epoch``
    sees each epoch's metrics record and stops the run by returning True (a tuner prunes).
    """
    start = time.perf_counter()  # the budget counts from here: loading and compiling too
    world = distributed.init(pick_device(cfg.device), cfg.rank_timeout)
    device = world.device(pick_device(cfg.device))
    if resume:  # before the plan's loading and timing: a mistake costs nothing
        refuse_a_finished_schedule(Path(resume), cfg.budget)
    plan = plan_run(cfg, device, world, start)  # the machine's decisions, checked before writing
    cfg, train_pipe, test_pipe = plan.cfg, plan.data.train, plan.data.test
    out = prepare_out(cfg, resume, overwrite, write=world.main)
    state = RunState.from_dict(latest_training_state(out)[0]) if resume else None
    totals = state.totals if state else Totals()
    agree_on_the_start(totals.epochs_done if state else -1, out, world)
    log = RunLog(out, records=state and state.metrics, write=world.main, tb=cfg.tensorboard)
    why = log.start({**cfg.to_dict(), WHY: plan.why}, resumed_after=state and totals.epochs_done)
    seed_everything(cfg.seed)
    # Before building: compiled artifacts carried from another machine fill the cache first.
    compile_cache = CompileCache(cfg, device, split_batch(cfg.batch_size, world))
    given = starting_model(cfg, state, model, model_kwargs)
    run = build_run(cfg, device, world, images=plan.data.images, **given)
    if state is not None:
        state.restore(run)
    steps = len(train_pipe)
    flops_per_image = functools.cache(lambda side: training_flops_per_image(run.model, side))
    eval_steps = eval_cost(cfg, plan.data.n_test) / cfg.batch_size
    clock = BudgetClock(
        cfg.budget, cfg.epochs * steps, eval_steps=eval_steps,
        elapsed=totals.wall_s, start=start, lag=int(world.active),
        time_driven=totals.time_driven, resumed_progress=totals.progress,
    )  # fmt: skip
    agreement = Agreement(world)

    def warm_up() -> None:  # compile the eval graph after the first step, not in the first eval
        evaluate(run.model_for_eval, [next(iter(test_pipe))], device, cfg.amp, cfg.channels_last)
        compile_cache.compiled()

    def clock_in() -> None:  # the budget used and where a resume would go on from, together
        totals.wall_s, totals.progress = clock.wall(), clock.resume_point()

    def save(records: list[dict]) -> Path | None:
        state = RunState.capture(run, totals, records)
        return save_training_state(out, state.to_dict(), cfg.keep) if world.main else None

    # --profile-steps: the second epoch, when the first has compiled and warmed everything up
    # (the first, in a run of one epoch).
    trace = cfg.profile_steps and world.main and StepTrace(out / "trace", device, cfg.profile_steps)
    stop, saved, every = None, None, cfg.checkpoint_every
    with graceful_interrupts() as signals:
        train_pipe.epoch = totals.epochs_done
        while stop is None:
            clock_in()
            # The state at the epoch's start: an interrupt mid-epoch saves this, so a resumed
            # run replays the whole epoch exactly rather than skipping its unfinished part.
            snapshot = RunState.capture(run, totals, log.records) if world.main else None
            first = warm_up if cfg.compile and totals.steps == 0 else None
            second = trace if trace and totals.epochs_done == min(1, cfg.epochs - 1) else None
            e = train_epoch(run, train_pipe, clock, agreement, signals, log, totals, first, second)
            if e.stop == "diverged":
                raise note_exit(Diverged(e.note), out, world)
            if e.stop == "signal" and e.steps < steps:
                when = f"during epoch {totals.epochs_done + 1}, which a resumed run repeats"
                saved = snapshot and save_training_state(out, snapshot.to_dict(), cfg.keep)
                raise note_exit(interrupted(signals, saved, out, when), out, world)
            totals.add(e, flops_per_image(e.side))
            totals.time_driven = clock.time_driven
            stop, evaluate_now = end_of_epoch(e, cfg, totals, clock, world, signals)
            if stop == "signal":  # saved first: a preemption's grace is short, an eval long
                clock_in()
                unscored = epoch_record(e, totals, None, 0.0, world, steps)
                t = time.perf_counter()
                saved = save([*log.records, unscored])
                if evaluate_now and time_to_evaluate(signals, clock, world, saved, t):
                    test_acc, eval_s = evaluate_run(run, test_pipe, world, clock, totals)
                    clock_in()
                    log.add(epoch_record(e, totals, test_acc, eval_s, world, steps))
                    saved = save(log.records)
                else:
                    log.add(unscored)
                break
            test_acc, eval_s = (
                evaluate_run(run, test_pipe, world, clock, totals) if evaluate_now else (None, 0.0)
            )
            clock_in()
            log.add(record := epoch_record(e, totals, test_acc, eval_s, world, steps))
            if on_epoch is not None and on_epoch(record):
                stop = stop or "on_epoch"
            if cfg.target_acc is not None and test_acc is not None and test_acc >= cfg.target_acc:
                stop = stop or "target_acc"
            every = every if every is not None else int(e.train_s > AUTO_CHECKPOINT_EPOCH_S)
            if every and totals.epochs_done % every == 0:
                saved = save(log.records)
    if stop == "signal":
        when = f"after epoch {totals.epochs_done} (step {totals.steps})"
        raise note_exit(interrupted(signals, saved, out, when), out, world)
    clock_in()
    steady = (totals.train_s - totals.compile_s) / (totals.steps - 1) if totals.steps > 1 else None
    compiled = compile_cache.finish(totals.compile_s, steady)
    return finish(run, log, totals, stop, why, out, world, compiled)


def finish(
    run: Run,
    log: RunLog,
    totals: Totals,
    stopped_by: str,
    why: dict,
    out: Path,
    world: World,
    compiled: dict,
) -> RunResult:
    """Write final.pt and summary.json; the last record holds the final accuracy.

    ``compiled``: what compiling cost and whether it hit the caches (``CompileCache``).
    """
    final_acc = log.records[-1]["test_acc"]
    summary = {
        "final_test_acc": final_acc,
        "stopped_by": stopped_by,
        "time_to_accuracy": log.tta,
        **asdict(totals),
        "compile": compiled,
        "budget_s": run.cfg.budget,
        "peak_memory_bytes": peak_memory(run.device),
        "device": device_name(run.device),
        "ranks": world.size,
        "ddp": isinstance(run.model_for_step, DistributedDataParallel),
        "versions": versions(),
        "preset": run.cfg.preset,
        "params": sum(p.numel() for p in run.model.parameters()),
        "model": run.name,
        "model_kwargs": run.kwargs,
        WHY: why,
    }
    dtype = step_dtype(run.cfg.amp)
    summary.update(utilisation(totals, dtype, cached_peak(run.device, dtype)))
    if world.main:
        meta = {"config": run.cfg.to_dict(), "test_acc": final_acc}
        save_model(out / "final.pt", run.shipped, run.name, run.kwargs, meta=meta)
        write_json(out / "summary.json", summary)
        log.close(summary)
        print(f"saved {out / 'final.pt'}", flush=True)
        print(format_summary(summary), flush=True)  # its last line: how much of the machine
    world.barrier()
    return RunResult(summary, run.shipped.eval(), out)
