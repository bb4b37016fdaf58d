"""The training loop: one run of ``fastmbv1 train``, from config to ``final.pt``.

The wall clock starts when ``train`` is called: loading data, building the pipeline and
compiling all count against ``cfg.budget``. Training stops early enough to leave time for
the final evaluation and save (the "reserve", re-estimated from each measured evaluation).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fastmbv1 import augment, distributed
from fastmbv1.checkpoint import (
    CHECKPOINT_GLOB,
    latest_training_state,
    model_from_record,
    model_record,
    save_model,
    save_training_state,
)
from fastmbv1.config import TrainConfig
from fastmbv1.errors import Diverged, Interrupted, UserError
from fastmbv1.evaluate import autocast, batch_dtype, evaluate, pick_device
from fastmbv1.metrics import RunLog, format_summary, write_json
from fastmbv1.models import build_model
from fastmbv1.schedule import lr_factor
from pipelines import build_pipeline, default_pipeline, unavailable
from pipelines.cifar10 import load_cifar10

# What a run writes besides its checkpoints (--overwrite clears them all).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "final.pt")
# Seconds kept free at the end of a budget for writing final.pt and summary.json.
SAVE_RESERVE_S = 1.0
# Without a GPU, checking the loss every step is free; on CUDA it would sync each step.
NAN_CHECK_EVERY = {"cpu": 1, "cuda": 25}


def resolve(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, list[str]]:
    """Fill the machine-dependent fields left as None; say which CUDA defaults were skipped."""
    notes = []
    cuda = device.type == "cuda"
    pipeline = cfg.pipeline or default_pipeline(device)
    reason = unavailable(pipeline, device)
    if reason:
        raise UserError(f"pipeline {pipeline!r} cannot run on {device}: {reason}")
    amp = cfg.amp or ("bf16" if cuda else "off")
    compile_ = cfg.compile if cfg.compile is not None else cuda
    if not cuda:
        skipped = [
            what
            for what, default in (
                ("bf16 autocast", cfg.amp is None),
                ("torch.compile", cfg.compile is None),
                ("the DALI GPU pipeline", cfg.pipeline is None),
            )
            if default
        ]
        if skipped:
            notes.append(f"no CUDA GPU: skipped {', '.join(skipped)} (CUDA-only defaults)")
    if cfg.sync_bn and not cuda:
        raise UserError(
            "--sync-bn needs CUDA GPUs under torchrun (SyncBatchNorm has no CPU kernel)"
        )
    if amp == "fp16" and not cuda:
        notes.append("fp16 autocast on the CPU is slow; bf16 or off is the usual choice")
    return replace(cfg, pipeline=pipeline, amp=amp, compile=compile_), notes


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
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {out} is not writable ({e.strerror})") from None
    return out


@contextmanager
def graceful_interrupts():
    """First SIGINT/SIGTERM: ask the loop to stop after this step. Second SIGINT: stop now."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        print(
            f"\n{flag['signal']}: finishing this step and saving a checkpoint "
            "(SIGINT again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    # Signal handlers can only be set from the main thread (not, say, inside a tuner thread).
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def rng_state() -> dict:
    """Every global generator's state, as tensors and plain numbers (weights_only-safe)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def versions() -> dict:
    try:
        from nvidia import dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "dali": dali_version}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:  # platform.processor() is empty on most Linux systems; cpuinfo names the model
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def pipeline_options(cfg: TrainConfig) -> dict:
    """The options only the torchvision pipeline takes."""
    return {"num_workers": cfg.num_workers} if cfg.pipeline == "torchvision" else {}


def recipe_pipeline(
    cfg: TrainConfig,
    images,
    labels,
    device: torch.device,
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
):
    """A pipeline as the recipe feeds it: its name, seed, batch dtype and options."""
    return build_pipeline(
        cfg.pipeline,
        images,
        labels,
        batch_size=batch_size,
        train=train,
        device=device,
        seed=cfg.seed,
        dtype=batch_dtype(cfg.amp),
        rank=rank,
        world_size=world_size,
        **pipeline_options(cfg),
    )


def optimisation(cfg: TrainConfig, params, device: torch.device):
    """The recipe's optimiser, grad scaler (live only for fp16) and loss."""
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    return optimizer, scaler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


@dataclass
class RunResult:
    summary: dict
    model: nn.Module  # the trained network itself (not the compiled wrapper), in eval mode
    out: Path


def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    model_kwargs: dict | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run one training job; its summary is also written to summary.json.

    ``model``/``model_kwargs`` start from a given network (pruning fine-tunes this way);
    ``resume`` continues the run in that folder from its newest checkpoint; ``on_epoch``
    sees each epoch's metrics record (a tuner reports them, and may raise to stop the run).
    """
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    world = distributed.init(device)
    device = world.device(device)
    cfg, notes = resolve(cfg, device)
    per_rank_batch = distributed.split_batch(cfg.batch_size, world)
    # Every input is checked before anything is written: a mistake leaves no half-made run.
    cifar = load_cifar10(cfg.data)
    shard = dict(rank=world.rank, world_size=world.size)
    train_pipe = recipe_pipeline(
        cfg,
        cifar.train_images[: cfg.train_limit],
        cifar.train_labels[: cfg.train_limit],
        device,
        train=True,
        batch_size=per_rank_batch,
        **shard,
    )
    test_pipe = recipe_pipeline(
        cfg,
        cifar.test_images[: cfg.test_limit],
        cifar.test_labels[: cfg.test_limit],
        device,
        train=False,
        batch_size=cfg.eval_batch_size,
        **shard,
    )
    steps_per_epoch = len(train_pipe)
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set")

    out = prepare_out(cfg, resume, overwrite, write=world.main)
    state = latest_training_state(out)[0] if resume else None
    say = print if world.main else (lambda *a, **k: None)  # only rank 0 talks and writes
    for note in notes:
        say(f"warning: {note}", file=sys.stderr, flush=True)
    say("config:", json.dumps(cfg.to_dict()), flush=True)
    if world.main:
        write_json(out / "config.json", cfg.to_dict())

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Fixed shapes every step: let cuDNN pick its fastest depthwise/pointwise kernels once.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if state is not None:
        raw = model_from_record(state["model_record"], out)
        model_name, model_kwargs = state["model_record"]["model"], state["model_record"]["kwargs"]
    elif model is not None:
        raw, model_name, model_kwargs = model, cfg.model, model_kwargs or {}
    else:
        model_kwargs = {"width": cfg.width, "normalize": cfg.normalize, "dropout": cfg.dropout}
        raw, model_name = build_model(cfg.model, **model_kwargs), cfg.model
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    raw = raw.to(device, memory_format=memory_format).train()
    net = raw
    if world.active:
        if cfg.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.index is not None else None
        )
    net = torch.compile(net) if cfg.compile else net

    optimizer, scaler, criterion = optimisation(cfg, raw.parameters(), device)

    start_epoch, step, elapsed_before = 0, 0, 0.0
    train_s_total = eval_s_total = compile_s = 0.0
    skipped_steps = 0
    records = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        elapsed_before, records = state["wall_s"], state["metrics"]
        train_s_total, eval_s_total = state["train_s_total"], state["eval_s_total"]
        compile_s, skipped_steps = state["compile_s"], state["skipped_steps"]
        say(f"resuming {out} after epoch {start_epoch} (step {step})", flush=True)
    log = RunLog(out, budget=cfg.budget, records=records, write=world.main)

    def wall() -> float:
        return elapsed_before + time.perf_counter() - t0

    total_steps = cfg.epochs * steps_per_epoch
    eval_estimate = None  # seconds one evaluation takes, once measured
    step_s = 0.0  # running estimate of one step's wall time, to stop before the budget does
    n_test = len(cifar.test_labels[: cfg.test_limit])
    nan_every = NAN_CHECK_EVERY.get(device.type, 1)
    checkpoint_every = cfg.checkpoint_every
    stopped_by = "epochs"

    def training_state(epoch: int) -> dict:
        """Everything a resume needs after ``epoch`` epochs, copied so training can go on."""
        return {
            "config": cfg.to_dict(),
            "model_record": model_record(raw, model_name, model_kwargs),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,
            "step": step,
            "wall_s": wall(),
            "train_s_total": train_s_total,
            "eval_s_total": eval_s_total,
            "compile_s": compile_s,
            "skipped_steps": skipped_steps,
            "metrics": list(log.records),
        }

    def save_checkpoint(state: dict) -> Path | None:
        return save_training_state(out, state["epoch"], state, cfg.keep) if world.main else None

    def interrupted(path: Path | None, after: str) -> Interrupted:
        return Interrupted(
            f"{interrupt['signal']} {after}; saved {path}; "
            f"continue with: fastmbv1 train --resume {out}"
        )

    def run_eval() -> float:
        nonlocal eval_s_total, eval_estimate
        t = time.perf_counter()
        # Each rank scores its own slice of the test set; the sums are the exact accuracy.
        correct, total = world.sum(
            list(evaluate(net, test_pipe, device, cfg.amp, cfg.channels_last)), device
        )
        eval_estimate = time.perf_counter() - t
        eval_s_total += eval_estimate
        return 100.0 * correct / total

    epoch, first_step, time_driven = start_epoch, step, False
    with graceful_interrupts() as interrupt:
        train_pipe.epoch = start_epoch
        for epoch in range(start_epoch, cfg.epochs):
            # The state at the epoch's start: an interrupt mid-epoch saves this, so a resumed
            # run replays the whole epoch exactly rather than skipping its unfinished part.
            start_state = training_state(epoch) if world.main else None
            t_epoch = time.perf_counter()
            data_wait = 0.0
            losses = torch.zeros(steps_per_epoch, device=device)
            lrs = []
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = done = 0
            # A CPU generator: mixing draws scalars on the host, so a GPU never syncs for them.
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            batches = iter(train_pipe)
            bar = log.bar(epoch + 1, steps_per_epoch)
            t_prev = None
            for i in range(steps_per_epoch):
                now = wall()
                # The first step of a run compiles and warms up: it says nothing of the rest.
                if t_prev is not None and step > first_step + 1:
                    step_s = now - t_prev if step_s == 0 else 0.8 * step_s + 0.2 * (now - t_prev)
                t_prev = now
                # Until an evaluation is measured, assume it costs what training does per image.
                eval_s = (
                    eval_estimate if eval_estimate is not None else n_test * step_s / cfg.batch_size
                )
                limit = cfg.budget - eval_s - SAVE_RESERVE_S
                # Time drives the schedule once the planned steps no longer fit (and from then
                # on, so the LR never jumps back), so a run that fits its budget is
                # step-driven and repeats exactly.
                time_driven = time_driven or now + step_s * (total_steps - step) > limit
                progress = step / total_steps
                if time_driven:
                    progress = max(progress, (now + step_s) / max(limit, 1e-9))
                progress, stop = world.agree(progress, bool(interrupt["signal"]), device)
                if stop:
                    interrupt["signal"] = interrupt["signal"] or "a signal on another rank"
                    break
                if progress >= 1.0:
                    stopped_by = "budget"
                    break
                lr = cfg.lr * lr_factor(
                    cfg.schedule, progress, epoch, warmup=cfg.warmup, decay=cfg.lr_decay
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t = time.perf_counter()
                x, y = next(batches)
                data_wait += time.perf_counter() - t
                if not cfg.channels_last:
                    x = x.contiguous()
                if cfg.cutout:
                    x = augment.cutout(x, cfg.cutout, gen)
                x, y_a, y_b, lam = augment.mix(
                    x, y, mixup=cfg.mixup, cutmix=cfg.cutmix, generator=gen
                )
                t_step = time.perf_counter()
                with autocast(device, cfg.amp):
                    logits = net(x)
                    loss = augment.mixed_loss(criterion, logits, y_a, y_b, lam)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                if scale_before is not None and scaler.get_scale() < scale_before:
                    skipped_steps += 1  # fp16 overflow: the scaler skipped this step
                if step == 0 and cfg.compile:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    compile_s = time.perf_counter() - t_step
                losses[i] = loss.detach()
                correct += (logits.argmax(1) == y_a).sum()
                seen += len(y)
                lrs.append(lr)
                step += 1
                done += 1
                if (i + 1) % nan_every == 0 or i + 1 == steps_per_epoch:
                    start = max(0, i + 1 - nan_every)
                    bad = (~torch.isfinite(losses[start : i + 1])).nonzero()
                    if len(bad):
                        j = start + int(bad[0])
                        bad_step = step - (i - j)
                        raise Diverged(
                            f"loss became {losses[j].item()} at step {bad_step} (epoch {epoch + 1},"
                            f" lr {lrs[j]:.4g}); lower --lr or use --amp bf16/off; the last "
                            f"checkpoint in {out} is from before it"
                        )
                bar.update()
                if log.interactive and i % 20 == 0:  # .item() syncs a GPU: not every step
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}", eta_budget=f"{max(cfg.budget - wall(), 0):.0f}s"
                    )
            bar.close()
            # A signal during the epoch's last step: every rank must see it before deciding.
            _, stop = world.agree(0.0, bool(interrupt["signal"]), device)
            if stop:
                interrupt["signal"] = interrupt["signal"] or "a signal on another rank"
            if interrupt["signal"] and done < steps_per_epoch:
                raise interrupted(
                    save_checkpoint(start_state),
                    f"during epoch {epoch + 1}, which a resumed run repeats from its start",
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_s = time.perf_counter() - t_epoch
            train_s_total += train_s
            if done == 0 and epoch > start_epoch:
                break  # the budget ran out exactly at an epoch boundary
            last = (
                epoch + 1 == cfg.epochs or stopped_by == "budget" or interrupt["signal"] is not None
            )
            test_acc = None
            if last or (epoch + 1) % cfg.eval_every == 0:
                test_acc = run_eval()
            log.add(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "lr": lrs[-1] if lrs else 0.0,
                    "train_loss": float(losses[:done].mean()) if done else float("nan"),
                    "train_acc": 100.0 * int(correct) / max(seen, 1),
                    "test_acc": test_acc,
                    "train_s": train_s,
                    "train_s_total": train_s_total,
                    "eval_s": eval_estimate if test_acc is not None else 0.0,
                    "eval_s_total": eval_s_total,
                    "wall_s": wall(),
                    "data_wait_s": data_wait,
                    "images_per_s": seen * world.size / max(train_s, 1e-9),  # all ranks
                    "complete": done == steps_per_epoch,
                }
            )
            if on_epoch is not None:
                on_epoch(log.records[-1])
            if checkpoint_every is None:  # auto: every epoch once epochs take over a minute
                checkpoint_every = 1 if train_s > 60 else 0
            if interrupt["signal"] or (checkpoint_every and (epoch + 1) % checkpoint_every == 0):
                path = save_checkpoint(training_state(epoch + 1))
            if interrupt["signal"]:
                raise interrupted(path, f"after epoch {epoch + 1} (step {step})")
            if cfg.target_acc is not None and test_acc is not None and test_acc >= cfg.target_acc:
                stopped_by = "target_acc"
                break
            if stopped_by == "budget":
                break

    if log.records[-1]["test_acc"] is None:
        log.set_last_test_acc(run_eval(), eval_estimate)
    final_acc = log.records[-1]["test_acc"]
    summary = {
        "final_test_acc": final_acc,
        "epochs_done": log.records[-1]["epoch"],
        "steps": step,
        "stopped_by": stopped_by,
        "time_to_accuracy": log.tta,
        "train_s": train_s_total,
        "eval_s": eval_s_total,
        "wall_s": wall(),
        "compile_s": compile_s,
        "budget_s": cfg.budget,
        "fp16_skipped_steps": skipped_steps,
        "peak_memory_bytes": peak_memory(device),
        "device": device_name(device),
        "versions": versions(),
        "params": sum(p.numel() for p in raw.parameters()),
        "model": model_name,
        "model_kwargs": model_kwargs,
    }
    if world.main:
        meta = {"config": cfg.to_dict(), "test_acc": final_acc}
        save_model(out / "final.pt", raw, model_name, model_kwargs, meta=meta)
        write_json(out / "summary.json", summary)
        print(format_summary(summary), flush=True)
        print(f"saved {out / 'final.pt'}", flush=True)
    world.barrier()
    return RunResult(summary, raw.eval(), out)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
