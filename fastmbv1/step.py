"""One training step, and the one builder of everything it needs.

``build_run`` makes the model, the modules that run it (compiled, wrapped in DDP), the
optimiser, the grad scaler and the loss from a config: the trainer, the bench, tune and
prune all build through it. ``train_step`` is the only place in fastmbv1 that runs forward,
backward and the optimiser step; it returns device tensors and never waits for the device.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from fastmbv1 import augment
from fastmbv1.checkpoint import model_info
from fastmbv1.config import TrainConfig, narrowest
from fastmbv1.distributed import World
from fastmbv1.ema import WeightAverage
from fastmbv1.errors import one_line
from fastmbv1.evaluate import autocast
from fastmbv1.models import build_model

# torch.compile's backend; the tests swap in "eager", which compiles in moments.
COMPILE_BACKEND = "inductor"
# DDP's gradient bucket size in MB (None: torch's 25, with a 1 MB first bucket); a test sets
# a small one to see the compiled graph split at each bucket.
DDP_BUCKET_CAP_MB: float | None = None
# No buffer broadcast before each forward: BN statistics are shared before each evaluation
# (World.share_buffers). torch 2.14 renamed the flag; torch >= 2.5 is supported.
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass
class Run:
    """A model ready to train: what ``train_step`` and the evaluation need, built once."""

    cfg: TrainConfig
    device: torch.device
    model: nn.Module  # the network itself: what is saved
    model_for_step: nn.Module  # what trains it: compiled and/or DDP-wrapped
    model_for_eval: nn.Module  # what evaluates the shipped model: compiled or not, never DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    name: str  # registry name and constructor arguments: what rebuilds the model
    kwargs: dict
    info: dict  # the saved-model record without weights (fastmbv1.checkpoint.model_info)
    skipped_steps: torch.Tensor  # fp16 steps the scaler skipped, counted on the device
    ema: WeightAverage | None = None  # with --ema, the average that is evaluated and saved

    @property
    def shipped(self) -> nn.Module:
        """The network that is evaluated and saved: the weights' average, or the weights."""
        return self.ema.model if self.ema is not None else self.model


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot work here (for example no C compiler), or None if it can."""
    try:
        probe = torch.compile(lambda x: (x * 2).sin(), backend=COMPILE_BACKEND)
        probe(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - whatever the backend raises, eager still works
        e = getattr(e, "inner_exception", e)  # dynamo wraps what the backend raised
        return f"{type(e).__name__}: {one_line(e)}"
    return None


def build_run(
    cfg: TrainConfig,
    device: torch.device,
    world: World | None = None,
    *,
    model: nn.Module | None = None,
    name: str | None = None,
    kwargs: dict | None = None,
) -> Run:
    """Everything a step of ``cfg`` needs on ``device``: a fresh model of ``cfg``, or the given
    ``model`` (registered as ``name`` with ``kwargs``, as pruning and resume give one)."""
    world = world or World()
    if model is None:
        name = cfg.model
        # A width the budget has not chosen (a preset built without a run) is the narrowest.
        width = narrowest(cfg).width
        kwargs = dict(width=width, normalize=cfg.normalize, dropout=cfg.dropout, tta=cfg.tta)
        model = build_model(name, **kwargs)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    # Fixed shapes every step: let cuDNN pick its fastest depthwise/pointwise kernels once.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if world.active and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None

    def compiled(m: nn.Module) -> nn.Module:
        return torch.compile(m, backend=COMPILE_BACKEND) if cfg.compile else m

    if cfg.compile:
        # Each run its own compile state: graphs of earlier runs in this process (a tuner's
        # trials) would otherwise fill dynamo's recompile limit and silently turn it off.
        torch._dynamo.reset()
    model_for_step = compiled(model)
    model_for_eval = compiled(ema.model) if ema else model_for_step
    if world.active:
        # Compiled inside DDP's forward, the graph still splits at each gradient bucket
        # (dynamo's DDPOptimizer; tests/test_scale.py), and evaluation reuses the compiled
        # module. Gradients live in the buckets: no copy in or out of them.
        ids = [device.index] if device.index is not None else None
        model_for_step = DistributedDataParallel(
            model_for_step,
            device_ids=ids,
            bucket_cap_mb=DDP_BUCKET_CAP_MB,
            gradient_as_bucket_view=True,
            **NO_BUFFER_SYNC,
        )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        # Fused on CUDA: one kernel, and the fp16 scaler's inf check stays on the device
        # (GradScaler.step reads it on the host for other optimisers). On the CPU the
        # fused kernel is ~200x slower than the default.
        fused=device.type == "cuda" or None,
    )
    return Run(
        cfg=cfg,
        device=device,
        model=model,
        model_for_step=model_for_step,
        model_for_eval=model_for_eval,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        name=name,
        kwargs=kwargs or {},
        info=model_info(model, name, kwargs or {}),
        skipped_steps=torch.zeros((), dtype=torch.int64, device=device),
        ema=ema,
    )


def set_lr(run: Run, lr: float) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = lr


def train_step(
    run: Run, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss (mixed by ``lam`` between labels ``y_a`` and ``y_b``), backward, step.

    Returns the loss and the number of predictions equal to ``y_a``, both on the device.
    """
    with record_function("forward"), autocast(run.device, run.cfg.amp):
        logits = run.model_for_step(x)
        loss = augment.mixed_loss(run.criterion, logits, y_a, y_b, lam)
    with record_function("backward"):
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
    with record_function("optimizer step"):
        run.scaler.step(run.optimizer)
        if run.scaler.is_enabled():  # an fp16 overflow skips the step: count it where known
            found_inf = sum(run.scaler._found_inf_per_device(run.optimizer).values())
            run.skipped_steps += found_inf.to(torch.int64)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update()
    return loss.detach(), (logits.argmax(1) == y_a).sum()
