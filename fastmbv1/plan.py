"""The decisions that need the machine, in one place, made once at the start of a run.

``make_config`` turns the preset ``auto`` into ``fast`` on a CUDA GPU and ``cpu`` otherwise;
``plan_run``, which ``train`` calls once, then ``resolve``s the fields a config leaves as
``None`` (pipeline, autocast, compile, a width the budget does not choose), probing that
compiling works, builds the data pipelines and, with ``fit_epochs``, times a few steps and
sizes the epochs (and the width) to what is left of the budget. Each decision comes with
its reason, which the run prints and saves in ``config.json``.

The same CPU kind has trained the same recipe at 2,400 images/s one day and 900 the next,
so no fixed epoch count suits a fixed budget: a few training steps on a random batch time
the machine as it is now, and the epochs that fit what is left of the budget, and
``PLAN_MARGIN`` more, become the schedule's length. The budget clock anneals a run that runs
out of time on time, but nothing can use the time a run leaves when it finishes its epochs
early, which it does whenever the machine is faster than it was timed (on a noisy day a
plain 150 s run timed 713 images/s, trained at 884, and finished its two epochs at 130 s).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fastmbv1 import config
from fastmbv1.clock import SAVE_RESERVE_S
from fastmbv1.compile_cache import read_record, setting_key
from fastmbv1.config import DEFAULT_MODEL, WIDTHS, TrainConfig, narrowest
from fastmbv1.data import RunData, run_pipelines
from fastmbv1.distributed import World, split_batch
from fastmbv1.errors import BudgetTooShort, UserError
from fastmbv1.step import compile_problem
from fastmbv1.timing import measure_step
from pipelines import default_pipeline, unavailable

# Besides the steps, an epoch waits for data and evaluates now and then: a few percent.
EPOCH_OVERHEAD = 0.05
# Each view of a test image costs about this share of a training image (forward only), which
# the final evaluation's reserve is priced at. On the CPU: 0.24 to 0.30 with flip TTA in
# batches of 64 (bench/results/eval-batch-cpu/results.txt against the training speeds of the
# runs beside it; 0.30 for CustomMobileNet), 0.16 to 0.20 with six views in batches of 21 (two
# 150 s runs on 2026-12-07). The largest: at 0.4 a six-view 150 s run held back about 29 s
# for an evaluation of 14.5.
EVAL_COST = 0.3
TIMED_STEPS = 5
# Epochs planned beyond those that fit at the speed timed at start. Five steps cannot see a
# shared machine's minute-scale swings: on 2026-12-07 four plain runs trained 1.24 to 1.40
# times as fast as timed. The one on code that already rounded the epochs up finished 20 s
# early of 150 (two earlier ones, rounding to the nearest, 70 s of 150 and 128 s of 600).
# A run that plans more than fits is annealed by the clock on time and ends at the budget
# if the machine runs up to 1.5 times as fast as timed. One whose timing held was mostly
# time-driven before too (its epochs rounded up), unless the fraction was within the
# epoch's few percent of overhead. Not yet compared in real runs with and without.
PLAN_MARGIN = 0.5
# What a cold torch.compile of the training and evaluation graphs is assumed to take on a GPU
# until the machine has recorded its own (fastmbv1.compile_cache): the low end of a desk
# review's 60-130 s (issue 23), not a measurement.
COLD_COMPILE_GUESS_S = 60.0
# A run without --width takes the widest of config.WIDTHS that fits this many epochs. The
# gap between half and quarter width at equal time shrinks by about 0.2 points an epoch
# (bench/results/ab-cpu-recipe.md), which puts the crossover near 3 epochs if it goes on
# so; 6 keeps a margin.
MIN_EPOCHS = 6
# A run that leaves both --model and --width open takes the first of these (network, width,
# fewest epochs it must fit) that fits its epochs. The original CustomMobileNet at full width
# trained 29 epochs in an hour at 451 img/s to 92.23 %, against 89.37 % for 63 epochs
# of half-width MobileNetV1 (bench/results/train-custom-3600-amd-epyc-2-cores/). Fewer epochs
# of it are not measured: 24 still takes it on a machine a fifth slower than that day's,
# where the 2.9 points it won by are unlikely to be made up by half width's extra epochs.
# At half width CustomMobileNet scored 0.59 points more than MobileNetV1 in 8 fixed epochs
# (two seeds each) but trained 12.5 % slower, and in 600 s back to back it lost: 85.18 % in the
# 8 epochs that fitted against 85.87 in 10. At quarter width it steps at 63 % of MobileNetV1's
# speed and scored 1.6 points less in 5 epochs (bench/results/ab-cpu-recipe.md).
# The last must be the fastest: fit_epochs times it first and bounds the others by it.
SIZES = (
    ("custom_mobilenet", 1.0, 24),
    *((DEFAULT_MODEL, width, MIN_EPOCHS) for width in WIDTHS),
)


def eval_cost(cfg: TrainConfig, n_test: int) -> float:
    """What evaluating ``n_test`` test images costs, in training images: ``EVAL_COST`` for
    each view the saved model takes of an image (2 with flip TTA, 6 with the shifts too)."""
    return n_test * EVAL_COST * cfg.eval_views


def auto_preset(device: str) -> str:
    """What ``--preset auto`` means on ``--device DEVICE``: the GPU recipe only on a GPU."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "fast" if cuda else "cpu"


def make_config(overrides: dict[str, Any], config_file: str | None = None) -> TrainConfig:
    """Defaults <- preset <- TOML file <- explicit overrides (flags), then type-checked; the
    preset ``auto`` is resolved for this machine first, so no saved config holds it."""
    given = config.settings(overrides, config_file)
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = auto_preset(given.get("device", "auto"))
    return config.merge(given, preset)


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config of the run in ``run_dir``, with only the flags that are safe to change."""
    return make_config(config.resumed_settings(run_dir, overrides))


def graphs_problem(device: torch.device, amp: str, world: World, muon: float = 0.0) -> str | None:
    """Why the training step cannot be captured as CUDA graphs here, or None if it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if muon:
        return "Muon reads its learning rate on the host"
    if amp == "fp16":
        return "the fp16 grad scaler decides on the host whether a step is skipped; use bf16"
    if world.active:
        # Capturing DDP's all-reduce needs DDP built on the capture stream, NCCL's watchdog
        # off during capture and every rank capturing alike; not done (nor tested) yet.
        return "not under DDP (torchrun) yet: each rank steps op by op"
    return None


def default_amp(cuda: bool) -> str:
    """The autocast a config that leaves ``amp`` open gets (on a CUDA GPU or not)."""
    return "bf16" if cuda else "off"


def resolve(
    cfg: TrainConfig, device: torch.device, world: World | None = None
) -> tuple[TrainConfig, dict[str, str]]:
    """Fill the machine-dependent fields left as None, and say why each got its value."""
    why = {}
    cuda = device.type == "cuda"
    pipeline = cfg.pipeline or default_pipeline(device)
    reason = unavailable(pipeline, device)
    if reason:
        raise UserError(f"pipeline {pipeline!r} cannot run on {device}: {reason}")
    if cfg.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (optional: only asked whether it is there)
        except ImportError:
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'fastmbv1[tensorboard]'"
            ) from None
    if cfg.sync_bn and not cuda:
        raise UserError(
            "--sync-bn needs CUDA GPUs under torchrun (SyncBatchNorm has no CPU kernel)"
        )
    defaults = {
        "pipeline": (pipeline, "DALI is the default on a CUDA GPU where it is installed"),
        "amp": (default_amp(cuda), "bf16 autocast is the default on a CUDA GPU only"),
        "compile": (cuda, "torch.compile is the default on a CUDA GPU only"),
        "eval_batch_size": (
            config.default_eval_batch(cuda, cfg.eval_views),
            f"{config.EVAL_BATCH} on a CUDA GPU; on the CPU about {config.CPU_EVAL_IMAGES} "
            f"images a forward, which its caches hold: {config.CPU_EVAL_IMAGES} over the "
            f"model's {cfg.eval_views} views of each test image",
        ),
    }
    filled = {}
    for name, (value, because) in defaults.items():
        if getattr(cfg, name) is None:
            filled[name] = value
            shown = {True: "on", False: "off"}.get(value, value)
            why[name] = f"{shown}: {because}"
    if cfg.amp == "fp16" and not cuda:
        why["amp"] = "fp16: slow on the CPU; bf16 or off is the usual choice"
    if filled.get("compile", cfg.compile):
        problem = compile_problem(device)
        if problem:  # e.g. no C compiler for Inductor: train eager rather than not at all
            filled["compile"] = False
            why["compile"] = f"off: torch.compile failed on a tiny probe ({problem}); eager"
    no_graphs = graphs_problem(device, filled.get("amp", cfg.amp), world or World(), cfg.muon)
    if cfg.cuda_graphs and no_graphs:
        raise UserError(f"--cuda-graphs: {no_graphs}")
    if cfg.cuda_graphs is None:
        filled["cuda_graphs"] = no_graphs is None
        why["cuda_graphs"] = (
            f"off: {no_graphs}" if no_graphs else "on: launched op by op the step is launch-bound"
        )
    if cfg.epochs is not None:
        smallest = narrowest(cfg)
        for name in ("model", "width"):
            value = getattr(smallest, name)
            if getattr(cfg, name) != value:
                filled[name] = value
                why[name] = f"{value:g}" if name == "width" else value
                why[name] += ": --epochs is given, so the budget does not choose it"
    return replace(cfg, **filled), why


def sizes(cfg: TrainConfig) -> list[tuple[str, float, int]]:
    """The (network, width, fewest epochs) the budget chooses from for ``cfg``, in order."""
    if cfg.model == "auto" and cfg.width is None:
        return list(SIZES)
    model = narrowest(cfg).model
    return [(model, width, MIN_EPOCHS) for width in (WIDTHS if cfg.width is None else (cfg.width,))]


def fit_epochs(
    cfg: TrainConfig, device: torch.device, world: World, start: float, steps: int, n_test: int
) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with ``epochs`` (and an automatic ``model`` and ``width``) set to what fits into
    what is left of the budget, and why, by field. Used when ``--epochs`` is not given (the
    ``cpu`` preset's default), which also lets the network's size follow the budget when
    ``--model`` or ``--width`` is left open (``sizes``).

    ``start``: when the run's clock started (``time.perf_counter``); ``steps``: training steps
    per epoch; ``n_test``: test images (the final evaluation must fit too).
    """
    choices, tried = sizes(cfg), []

    def rank_speed(model: str, width: float) -> float:
        """This rank's images/s for the network at that width, timed on a random batch."""
        per_rank = replace(
            cfg, model=model, width=width, batch_size=split_batch(cfg.batch_size, world)
        )
        return measure_step(per_rank, device, steps=TIMED_STEPS, warmup=1)["images_per_s"]

    def fit(speed: float) -> tuple[float, float, float]:
        """(epochs that fit now, images/s of all ranks, seconds left) at a rank's speed."""
        # Every rank must choose the same size and epochs: they agree on the slowest rank's
        # speed and the time the latest one has used, and all compute the same from those.
        slowest, used = world.max_over_ranks(-speed, time.perf_counter() - start)
        speed = -slowest * world.size
        final_eval = eval_cost(cfg, n_test) / speed
        epoch_s = steps * cfg.batch_size / speed * (1 + EPOCH_OVERHEAD)
        left_s = cfg.budget - used
        return (left_s - final_eval - SAVE_RESERVE_S) / epoch_s, speed, left_s

    # The smallest size is timed first. No other is faster, so a size that would not fit its
    # epochs even at the smallest's speed is passed over without spending budget on timing it.
    smallest_speed = rank_speed(*choices[-1][:2])
    bound = fit(smallest_speed)[0]
    for model, width, fewest in choices:
        size = f"{model} at width {width:g}"
        last = (model, width, fewest) == choices[-1]
        if not last and bound < fewest:
            tried.append(f"at most {bound:.1f} epochs of {size} (needs {fewest}; not timed)")
            continue
        fits, speed, left_s = fit(smallest_speed if last else rank_speed(model, width))
        tried.append(f"{fits:.1f} epochs of {size} (needs {fewest})")
        if fits >= fewest:
            break
    if fits <= 0:  # not even the final evaluation fits: any run would overrun its budget
        fewer_views = ", or fewer views with --no-tta-translate" if cfg.eval_views == 6 else ""
        raise BudgetTooShort(
            f"--budget {cfg.budget:g} is too short on this machine now: {max(left_s, 0):.0f} s "
            f"are left after start-up, and evaluating the {n_test:,} test images "
            f"({cfg.eval_views} views each) and saving take about "
            f"{eval_cost(cfg, n_test) / speed + SAVE_RESERVE_S:.0f} s at the {speed:,.0f} "
            f"images/s measured; give a larger --budget, fewer test images with --test-limit"
            f"{fewer_views}"
        )
    epochs = max(1, math.ceil(fits * (1 + PLAN_MARGIN)))
    why = {
        "epochs": f"{epochs}: measured {speed:,.0f} images/s on a random batch; the "
        f"{left_s:.0f} s left of --budget {cfg.budget:g} fit about {fits:.1f} epochs of {size}; "
        f"{PLAN_MARGIN:.0%} more planned, so a machine faster than timed still fills the budget "
        "(the clock anneals on time)"
    }
    chosen = f"the first that fits the epochs it needs, else the last; {', '.join(tried)}"
    if cfg.model == "auto":
        why["model"] = f"{model}: " + (chosen if len(choices) > 1 else "the default network")
    if cfg.width is None:
        why["width"] = f"{width:g}: {chosen}"
    return replace(cfg, model=model, width=width, epochs=epochs), why


@dataclass
class Plan:
    """What a run was decided to be on this machine: its config, why, and its data."""

    cfg: TrainConfig
    why: dict[str, str]
    data: RunData


def compile_pays(
    compile_s: float, steps: float, eager_step_s: float, compiled_step_s: float | None = None
) -> tuple[bool, float]:
    """(whether it pays, the seconds it can save): compiling, expected to take
    ``compile_s``, pays if it saves more over ``steps`` steps, which is their eager time less
    their compiled time, or, with no compiled step measured yet, at most all of their time."""
    share = 1 - compiled_step_s / eager_step_s if compiled_step_s else 1.0
    saving = steps * eager_step_s * share
    return compile_s < saving, saving


def compile_by_budget(
    cfg: TrainConfig, device: torch.device, world: World, start: float, steps: int
) -> tuple[TrainConfig, str]:
    """``cfg`` compiled or eager, as the expected compile time pays back within the budget,
    and why. The compile's seconds and the step's with and without it come from this
    machine's record (``fastmbv1.compile_cache``) where runs have measured them; the eager
    step is otherwise timed now, and a compile never recorded here is assumed to take
    ``COLD_COMPILE_GUESS_S``. ``steps``: training steps per epoch."""
    # A network the budget has yet to choose is timed as the smallest: a lower bound on the
    # step, so on the saving too.
    per_rank = replace(narrowest(cfg), batch_size=split_batch(cfg.batch_size, world))
    record = read_record(setting_key(per_rank, device, per_rank.batch_size))
    if "warm_s" in record:
        expected, source = record["warm_s"], "as its last warm compile here"
    elif "cold_s" in record:
        expected, source = record["cold_s"], "as its last compile here, cold"
    else:
        expected, source = COLD_COMPILE_GUESS_S, "an estimate: none recorded on this machine"
    if "eager_step_s" in record:  # both step times from runs, if the compiled one is known
        eager, compiled = record["eager_step_s"], record.get("compiled_step_s")
    else:  # the step alone, timed now: comparable to no run's figure
        timed = measure_step(
            replace(per_rank, compile=False), device, steps=TIMED_STEPS, warmup=TIMED_STEPS
        )
        eager, compiled = timed["step_s"], None
    left = cfg.budget - (time.perf_counter() - start)
    total = min(cfg.epochs * steps if cfg.epochs else float("inf"), max(left, 0.0) / eager)
    pays, saving = compile_pays(expected, total, eager, compiled)
    (someone_refuses,) = world.max_over_ranks(float(not pays))  # every rank the same
    how_much = f"{saving:.0f} s" if compiled else f"at most {saving:.0f} s"
    weighed = (
        f"a compile expected to take {expected:.0f} s ({source}) against the {how_much} "
        f"it can save over {total:.0f} steps of {eager * 1000:.1f} ms"
    )
    if someone_refuses:
        return replace(cfg, compile=False), f"off: it cannot pay back: {weighed}; eager"
    return cfg, f"on: it pays back: {weighed}"


def plan_run(cfg: TrainConfig, device: torch.device, world: World, start: float) -> Plan:
    """Resolve ``cfg`` for ``device``, build its pipelines, and fit its epochs (and width) to
    the budget if it leaves them open. Everything a user can get wrong is checked here,
    before the run writes anything."""
    compile_left_open = cfg.compile is None
    cfg, why = resolve(cfg, device, world)
    data = run_pipelines(cfg, device, world)
    if compile_left_open and cfg.compile and device.type == "cuda":
        cfg, why["compile"] = compile_by_budget(cfg, device, world, start, len(data.train))
    if cfg.epochs is None:  # as many as fit into the budget at the speed measured now
        cfg, fitted = fit_epochs(cfg, device, world, start, len(data.train), data.n_test)
        why.update(fitted)
    return Plan(cfg, why, data)
