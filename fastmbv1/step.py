"""One training step, and the one builder of everything it needs.

``build_run`` makes the model, the modules that run it (compiled, wrapped in DDP), the
optimiser, the grad scaler and the loss from a config: the trainer, the bench, tune and
prune all build through it. ``train_step`` is the only place in fastmbv1 that runs forward,
backward and the optimiser step; it returns device tensors and never waits for the device.

With ``cuda_graphs`` the step is captured once per batch shape and replayed (``StepGraphs``):
a step of MobileNetV1 is a few hundred small kernels, and at batch 512 launching them one by
one from Python costs more than running them. What changes from step to step reaches the
graph through device tensors updated in place: the batch and its labels (copied into the
captured inputs), the learning rate (the optimiser's ``lr`` is one device tensor, which fused
SGD reads on the device) and mixup's or cutmix's lambda. The permutation that mixes a batch
is applied before the step (``fastmbv1.augment``), so only its result, the second labels,
enters the graph. Progressive resizing gets one graph per image side; a new side is warmed
up, then captured, and the graphs of smaller sides are released, since sides only grow.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
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
from fastmbv1.models import build_model, takes
from fastmbv1.models.init import dirac_pointwise, whiten_stem
from fastmbv1.optim import SGDWithMuon, build_optimizer

# torch.compile's backend; the tests swap in "eager", which compiles in moments.
COMPILE_BACKEND = "inductor"
# DDP's gradient bucket size in MB (None: torch's 25, with a 1 MB first bucket); a test sets
# a small one to see the compiled graph split at each bucket.
DDP_BUCKET_CAP_MB: float | None = None
# No buffer broadcast before each forward: BN statistics are shared before each evaluation
# (World.share_buffers). torch 2.14 renamed the flag; torch >= 2.9 is supported.
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
    optimizer: torch.optim.Optimizer | SGDWithMuon
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    name: str  # registry name and constructor arguments: what rebuilds the model
    kwargs: dict
    info: dict  # the saved-model record without weights (fastmbv1.checkpoint.model_info)
    skipped_steps: torch.Tensor  # fp16 steps the scaler skipped, counted on the device
    ema: WeightAverage | None = None  # with --ema, the average that is evaluated and saved
    graphs: StepGraphs | None = None  # with --cuda-graphs on CUDA: the step, captured

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


# The config fields that decide the network: model_spec builds it from them, and prune,
# whose network comes from its checkpoint, refuses them as flags.
MODEL_FIELDS = ("model", "width", "normalize", "dropout", "depthwise_relu", "tta", "tta_translate")


def model_spec(cfg: TrainConfig) -> tuple[str, dict]:
    """The registered network ``cfg`` trains and the options it is built with. A size the
    budget has not chosen (a preset built without a run) is the smallest."""
    smallest = narrowest(cfg)
    kwargs = {f: getattr(smallest, f) for f in MODEL_FIELDS[1:]}
    # Only when off, and only to a network that takes it: one registered without depthwise
    # blocks has no such ReLU to drop, and a final.pt with the ReLUs records what it did
    # before the option.
    if cfg.depthwise_relu or not takes(smallest.model, "depthwise_relu"):
        del kwargs["depthwise_relu"]
    return smallest.model, kwargs


def build_run(
    cfg: TrainConfig,
    device: torch.device,
    world: World | None = None,
    *,
    model: nn.Module | None = None,
    name: str | None = None,
    kwargs: dict | None = None,
    images: np.ndarray | None = None,
) -> Run:
    """Everything a step of ``cfg`` needs on ``device``: a fresh model of ``cfg``, or the given
    ``model`` (registered as ``name`` with ``kwargs``, as pruning and resume give one).

    ``images``: training images for ``cfg.whiten``'s stem; a bench that times the step
    passes none, since the initial weights do not change its cost.
    """
    world = world or World()
    if model is None:
        name, kwargs = model_spec(cfg)
        model = build_model(name, **kwargs)
        if cfg.whiten and images is not None:
            whiten_stem(model, images)
        if cfg.dirac:
            dirac_pointwise(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.bn_momentum
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    # Fixed shapes every step: let cuDNN pick its fastest depthwise/pointwise kernels once.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if world.active and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = WeightAverage(model, cfg.ema) if cfg.ema else None

    def compiled(m: nn.Module, **kw) -> nn.Module:
        return torch.compile(m, backend=COMPILE_BACKEND, **kw) if cfg.compile else m

    if cfg.compile:
        # Each run its own compile state: graphs of earlier runs in this process (a tuner's
        # trials) would otherwise fill dynamo's recompile limit and silently turn it off.
        torch._dynamo.reset()
    model_for_step = compiled(model)
    # The evaluation has a batch of its own (evaluate pads the last one to it): compiled
    # static, or dynamo, seeing a second batch size, would make the batch dimension symbolic.
    model_for_eval = compiled(ema.model if ema else model, dynamic=False)
    if world.active:
        # Compiled inside DDP's forward, the graph still splits at each gradient bucket
        # (dynamo's DDPOptimizer; tests/test_scale.py). Gradients live in the buckets: no
        # copy in or out of them.
        ids = [device.index] if device.index is not None else None
        model_for_step = DistributedDataParallel(
            model_for_step,
            device_ids=ids,
            bucket_cap_mb=DDP_BUCKET_CAP_MB,
            gradient_as_bucket_view=True,
            **NO_BUFFER_SYNC,
        )
    optimizer = build_optimizer(model, cfg, device)
    run = Run(
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
    if cfg.cuda_graphs and device.type == "cuda":
        run.graphs = StepGraphs(run)
    return run


def set_lr(run: Run, lr: float) -> None:
    for i, group in enumerate(run.optimizer.param_groups):
        if run.graphs is not None:  # in place: a captured step reads it on the device
            run.graphs.lrs[i].fill_(lr * group["lr_scale"])
        else:
            group["lr"] = lr * group["lr_scale"]


def train_step(
    run: Run, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss (mixed by ``lam`` between labels ``y_a`` and ``y_b``), backward, step.

    Returns the loss and the number of predictions equal to ``y_a``, both on the device.
    """
    if run.graphs is not None:
        loss, hits = run.graphs.step(x, y_a, y_b, lam)
    else:
        loss, hits = eager_step(run, x, y_a, y_b, lam)
    if run.ema is not None:  # outside any graph: its decay changes on the host every step
        run.ema.update()
    return loss, hits


def eager_step(
    run: Run, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``train_step``'s work, op by op (``lam`` may be a device tensor: see StepGraphs)."""
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
    return loss.detach(), (logits.argmax(1) == y_a).sum()


# Eager steps at each new batch shape before it is captured: compiling, cuDNN's kernel
# choice, the optimiser's momentum buffers and cuBLAS's workspace all happen then, never
# inside a capture (PyTorch's CUDA graphs notes warm up three steps on the capture stream).
GRAPH_WARMUP_STEPS = 3


@dataclass
class Captured:
    """One captured step: its graph and the tensors it reads and writes, at fixed addresses."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    loss: torch.Tensor
    hits: torch.Tensor


class StepGraphs:
    """The training step as CUDA graphs, one per batch shape (see the module's docstring).

    Only for one process and no grad scaler (``fastmbv1.plan.resolve`` decides): the fp16
    scaler keeps its state on the host, and DDP would need its own capture rules. The loss
    and the hit count are computed inside the graph.
    """

    def __init__(self, run: Run):
        if run.scaler.is_enabled():
            raise ValueError("CUDA graphs do not capture the fp16 grad scaler's host state")
        self.run = run
        self.stream = torch.cuda.Stream(run.device)  # warm-up and capture, one stream
        # One learning rate per optimiser group (their --bias-lr scales differ).
        self.lrs = [
            torch.tensor(float(g["lr"]), device=run.device) for g in run.optimizer.param_groups
        ]
        # Mixing recipes pass lambda as a device tensor; the others the constant 1.0, which
        # keeps their loss one cross-entropy rather than two.
        self.mixes = run.cfg.mixup > 0 or run.cfg.cutmix > 0
        self.lam = torch.ones((), device=run.device)
        self.captured: dict[tuple, Captured] = {}
        self.warm: dict[tuple, int] = {}  # eager steps run so far at each shape

    def step(
        self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixes:
            self.lam.fill_(lam)
        key = (tuple(x.shape), x.stride(), x.dtype)
        c = self.captured.get(key)
        if c is None and self.warm.get(key, 0) < GRAPH_WARMUP_STEPS:
            self.warm[key] = self.warm.get(key, 0) + 1
            return self.on_stream(lambda: eager_step(self.run, x, y_a, y_b, self.lam_arg()))
        if c is None:
            self.captured.clear()  # a new side: the smaller ones never come back
            c = self.captured[key] = self.capture(x, y_a, y_b)
        with record_function("step (CUDA graph)"):
            c.x.copy_(x)
            c.y_a.copy_(y_a)
            c.y_b.copy_(y_b)
            c.graph.replay()
        # Copies: the captured outputs are overwritten by the next replay.
        return c.loss.clone(), c.hits.clone()

    def lam_arg(self) -> float | torch.Tensor:
        return self.lam if self.mixes else 1.0

    def on_stream(self, fn):
        """``fn()`` on the capture stream, ordered after and before the current stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.run.device))
        for group, lr in zip(self.run.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr  # resume may have loaded floats
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream(self.run.device).wait_stream(self.stream)
        return out

    def capture(self, x: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> Captured:
        graph = torch.cuda.CUDAGraph()
        inputs = x.clone(memory_format=torch.preserve_format), y_a.clone(), y_b.clone()

        def record() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.cuda.graph(graph, stream=self.stream):
                return eager_step(self.run, *inputs, self.lam_arg())

        loss, hits = self.on_stream(record)
        return Captured(graph, *inputs, loss, hits)
