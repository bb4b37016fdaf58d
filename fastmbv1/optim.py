"""The optimiser: Nesterov SGD in three groups, and optionally Muon on the pointwise convs.

With ``--muon F``, Muon updates each 1x1 conv's weight through a (C_out, C_in) parameter
that shares its storage: Muon's in-place update is the conv's, the model and its checkpoints
keep their 4-D weights, and nothing about the network changes. The depthwise filters, the
stem and the classifier stay with SGD (Muon orthogonalises a layer's map from inputs to
outputs; a depthwise filter's 9 taps, or the head, are not one).

``Muon`` here is ``torch.optim.Muon``'s update, step for step, with one change: the dtype
of its Newton-Schulz iterations. torch's runs them in bfloat16, which a CPU without bf16
instructions (AVX2 only) emulates: one 512 x 512 product took 221-317 ms there against
2-16 ms in fp32, and a half-width step 6.8 s (``bench/results/ab-levers-cpu/muon_step.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from fastmbv1.config import TrainConfig
from fastmbv1.models.mobilenet import is_depthwise


def pointwise_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's 1x1, ungrouped convs: the ones Muon can see as matrices."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.groups == 1
        and m.weight.requires_grad
    ]


def depthwise_weights(model: nn.Module) -> list[nn.Parameter]:
    """The depthwise convs' filters: one 3x3 filter per channel, a few parameters each."""
    return [m.weight for m in model.modules() if is_depthwise(m)]


def param_groups(
    model: nn.Module, cfg: TrainConfig, leave_out: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """SGD's groups: the conv and linear weights; the batch-norm weights; the biases
    (batch-norm and classifier), at ``--bias-lr`` times the learning rate with their weight
    decay divided by as much. ``--no-bn-decay`` takes the decay off the last two;
    ``--depthwise-decay F`` puts the depthwise filters in a fourth group at F times the decay.
    ``leave_out``: parameters another optimiser updates."""
    skip = {id(p) for p in leave_out}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    # A fourth group only where it differs: the groups of older checkpoints stay loadable.
    apart = {id(p) for p in depthwise_weights(model)} if cfg.depthwise_decay != 1 else set()
    decay = cfg.weight_decay if cfg.bn_decay else 0.0
    groups = [
        {"params": [p for _, p in trained if p.ndim > 1 and id(p) not in apart], "lr_scale": 1.0},
        {"params": [p for n, p in trained if p.ndim == 1 and not n.endswith("bias")],
         "lr_scale": 1.0, "weight_decay": decay},
        {"params": [p for n, p in trained if p.ndim == 1 and n.endswith("bias")],
         "lr_scale": cfg.bias_lr, "weight_decay": decay / cfg.bias_lr},
    ]  # fmt: skip
    if apart:
        groups.append(
            {
                "params": [p for _, p in trained if id(p) in apart],
                "lr_scale": 1.0,
                "weight_decay": cfg.weight_decay * cfg.depthwise_decay,
            }
        )
    return groups


def ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies in it (CUDA; CPUs with AVX-512 BF16 or AMX,
    where a 512 x 512 product took 0.6 ms against fp32's 4.8), float32 where it would be
    emulated."""
    if device.type != "cpu":
        return torch.bfloat16
    # torch's own CPU capability checks (private, but what Inductor asks); no public one says bf16.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def orthogonalize(g: torch.Tensor, dtype: torch.dtype, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards the nearest semi-orthogonal matrix, with
    torch.optim.Muon's coefficients (which trade convergence for slope at zero: the singular
    values land in about 0.5-1.5, and Muon does not need more)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    wide = g.size(0) <= g.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # not in place: in fp32, x may be the caller's tensor
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon (momentum, then Newton-Schulz, then a step of lr * sqrt(max(1,
    rows / cols)) after decoupled decay) with its iterations in ``ns_dtype``. Its state has
    torch's keys, so the checkpoints of runs that used torch's load here."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        ns_dtype: torch.dtype,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                rows, cols = p.shape
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(
                    orthogonalize(update, self.ns_dtype), alpha=-lr * math.sqrt(max(1, rows / cols))
                )


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.SGD | SGDWithMuon:
    """SGD over ``param_groups``; with ``cfg.muon``, ``SGDWithMuon``. Each group carries an
    ``lr_scale``: the schedule's learning rate times it is the group's (``step.set_lr``)."""
    muon_weights = pointwise_weights(model) if cfg.muon else []
    sgd = torch.optim.SGD(
        param_groups(model, cfg, leave_out=muon_weights),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        # Fused on CUDA: one kernel, and the fp16 scaler's inf check stays on the device
        # (GradScaler.step reads it on the host for other optimisers). On the CPU the
        # fused kernel is ~200x slower than the default.
        fused=device.type == "cuda" or None,
    )
    return SGDWithMuon(sgd, muon_weights, cfg) if muon_weights else sgd


class SGDWithMuon:
    """SGD, then Muon on the pointwise weights, behind the one optimiser's interface that the
    step, the schedule and the checkpoints use. Not with the fp16 grad scaler (config
    refuses): it unscales and checks for inf only the gradients of ``param_groups``, and the
    4-D weights Muon updates are in none of them."""

    def __init__(self, sgd: torch.optim.SGD, weights: list[nn.Parameter], cfg: TrainConfig):
        self.sgd = sgd
        self.pairs = [(w, nn.Parameter(w.detach().view(w.shape[0], -1))) for w in weights]
        # Decoupled decay (Muon shrinks the weight by lr * decay a step): as much per step as
        # SGD's coupled decay, which its momentum amplifies by 1 / (1 - momentum).
        decay = cfg.weight_decay / ((1 - cfg.momentum) * cfg.muon)
        self.muon = Muon(
            [{"params": [m for _, m in self.pairs], "lr_scale": cfg.muon}],
            lr=cfg.lr * cfg.muon,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=decay,
            ns_dtype=ns_dtype(weights[0].device),
        )

    @property
    def param_groups(self) -> list[dict]:
        return [*self.sgd.param_groups, *self.muon.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)
        for w, m in self.pairs:
            m.grad = None  # step hands it a view of w.grad
            if set_to_none or w.grad is None:
                w.grad = None
            else:
                w.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.sgd.step()
        for w, m in self.pairs:
            m.grad = None if w.grad is None else w.grad.view(m.shape)
        self.muon.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        self.muon.load_state_dict(state["muon"])
