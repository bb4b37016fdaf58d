"""What a training step costs, counted from the layer shapes: FLOPs and bytes per layer.

Not ``torch.utils.flop_counter.FlopCounterMode``: on torch 2.14 it counts the backward of a
grouped convolution as if the convolution were dense (65 times the forward for a depthwise
3x3 conv of 64 channels, against 2 times at groups=1), which puts MobileNetV1's backward at
879 MFLOP against a 93 MFLOP forward. Here every conv and linear layer costs 2 FLOPs per
multiply-accumulate forward, and its backward the same again for the input's gradient and
once more for the weights' gradient: 6 times the MACs in all, 4 times for the stem, whose
input is data and needs no gradient.

Bytes follow one rule, which makes them a lower bound for any implementation that does not
fuse across layers: each pass (forward, backward) of a layer reads every tensor it needs
once and writes every tensor it makes once. A batch norm and the ReLU after it count as one
layer, as a compiler fuses them; the loss and a residual block's addition are not counted,
which only lowers the bound.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastmbv1.models.mobilenet import Normalize, is_depthwise

# Weights, their gradients and the optimiser's momentum stay float32 under autocast.
PARAM_BYTES = 4
# FLOPs per element of the elementwise layers, (forward, backward): a stated convention.
# Batch norm in training mode: 5 forward (fvcore's count: mean, variance, normalise, scale,
# shift), 8 backward (the sums for the scale's and shift's gradients, then the input's).
ELEMENTWISE_FLOPS = {"bn": (5, 8), "relu": (1, 1), "pool": (1, 1), "normalize": (2, 0)}
# The kinds whose FLOPs are the model's FLOPs (MFU's numerator, as MFU is usually counted).
MATMUL_KINDS = ("conv", "depthwise", "pointwise", "linear")
BatchNorm = nn.modules.batchnorm._BatchNorm  # SyncBatchNorm (--sync-bn) is one too
ELEMENTWISE_MODULES = (
    (BatchNorm, "bn"), (nn.ReLU, "relu"), (nn.AdaptiveAvgPool2d, "pool"), (Normalize, "normalize"),
)  # fmt: skip


@dataclass(frozen=True)
class LayerCost:
    """One layer's work in a training step. Per-image figures scale with the batch."""

    name: str  # stem, dw4, pw4, sc4 (a shortcut), dw4 bn+relu, classifier, ...
    kind: str  # conv, depthwise, pointwise, linear, bn, bn+relu, relu, pool, normalize, sgd
    paths: tuple[str, ...]  # its modules, as ``model.get_submodule`` names them
    in_shape: tuple[int, ...]  # one image's input
    macs: int = 0  # forward multiply-accumulates per image (conv, linear)
    forward_flops: int = 0  # per image
    backward_flops: int = 0  # per image
    activations: int = 0  # activation elements read or written per image, both passes
    parameters: int = 0  # parameter-sized elements read or written per step
    step_flops: int = 0  # per step whatever the batch: the optimiser's update
    input_grad: bool = True  # whether the backward makes its input's gradient

    def flops(self, batch: int) -> int:
        """FLOPs of this layer in one training step of ``batch`` images."""
        return batch * (self.forward_flops + self.backward_flops) + self.step_flops

    def bytes(self, batch: int, activation_bytes: int) -> int:
        """Bytes it moves in one step, with activations of ``activation_bytes`` each."""
        return batch * self.activations * activation_bytes + self.parameters * PARAM_BYTES


def _matmul_cost(name, kind, path, m: nn.Module, shape_in, shape_out, input_grad) -> LayerCost:
    weights = m.weight.numel()
    n_in, n_out = math.prod(shape_in), math.prod(shape_out)
    # A conv's output costs (C_in / groups) x kh x kw MACs: its weight's first filter.
    macs = n_out * (m.weight[0].numel() if isinstance(m, nn.Conv2d) else n_in)
    return LayerCost(
        name,
        kind,
        (path,),
        shape_in,
        macs=macs,
        forward_flops=2 * macs,
        # The weights' gradient costs one forward; the input's, where needed, another.
        backward_flops=2 * macs * (2 if input_grad else 1),
        # forward: x, y; backward: dy, x, and dx where needed
        activations=n_in + n_out + n_out + n_in + (n_in if input_grad else 0),
        # forward: w; backward: dw, and w where dx is made
        parameters=weights * (3 if input_grad else 2),
        input_grad=input_grad,
    )


def _elementwise_cost(name, kind, paths, shape_in, shape_out, channels) -> LayerCost:
    n_in, n_out = math.prod(shape_in), math.prod(shape_out)
    flops = [ELEMENTWISE_FLOPS[k] for k in kind.split("+")]
    forward, backward = (sum(f[i] for f in flops) * n_in for i in (0, 1))
    if kind == "normalize":  # the data needs no gradient: forward only
        return LayerCost(name, kind, paths, shape_in, forward_flops=forward,
                         activations=n_in + n_out, input_grad=False)  # fmt: skip
    # Backward: dy, then x (batch norm and the ReLU mask need it; pooling does not), dx.
    backward_reads = n_out + (0 if kind == "pool" else n_in)
    return LayerCost(
        name,
        kind,
        paths,
        shape_in,
        forward_flops=forward,
        backward_flops=backward,
        activations=n_in + n_out + backward_reads + n_in,
        # batch norm: scale and shift read forward; scale read, both gradients written back
        parameters=5 * channels if "bn" in kind else 0,
    )


def _role(path: str, m: nn.Module) -> tuple[str, str]:
    """(kind, short name) of a conv at ``path``: stem, dw4, pw4, sc4 or its path."""
    if is_depthwise(m):
        kind, short = "depthwise", "dw"
    elif m.kernel_size == (1, 1):
        kind, short = "pointwise", "sc" if "shortcut" in path else "pw"
    else:
        kind, short = "conv", "conv"
    if path.startswith("stem"):
        return kind, "stem"
    block = re.search(r"blocks\.(\d+)", path)
    return kind, f"{short}{int(block.group(1)) + 1}" if block else path


def layer_costs(model: nn.Module, side: int = 32) -> list[LayerCost]:
    """The layers ``model`` runs for one ``side`` x ``side`` image, in call order, and what
    each costs in training. Counted on a copy on the meta device: no arithmetic is done,
    and the model, its device and its statistics are left as they are. The copy runs in
    eval mode, where a SyncBatchNorm needs no other rank; the shapes are the same."""
    meta = copy.deepcopy(model).to("meta").eval()
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    kinds = (nn.Conv2d, nn.Linear, BatchNorm, nn.ReLU, nn.AdaptiveAvgPool2d, Normalize)
    hooks = [
        m.register_forward_hook(
            lambda m, args, out, path=path: calls.append((path, m, args[0], out))
        )
        for path, m in meta.named_modules()
        if isinstance(m, kinds)
    ]
    try:
        with torch.enable_grad():  # which inputs need a gradient is part of the cost
            meta(torch.empty(1, 3, side, side, device="meta"))
    finally:
        for h in hooks:
            h.remove()

    costs: list[LayerCost] = []
    last_conv, last_bn_out = "", None
    for path, m, x, y in calls:
        shape_in, shape_out = tuple(x.shape[1:]), tuple(y.shape[1:])
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            kind, name = _role(path, m) if isinstance(m, nn.Conv2d) else ("linear", "classifier")
            last_conv = name
            costs.append(_matmul_cost(name, kind, path, m, shape_in, shape_out, x.requires_grad))
        elif isinstance(m, nn.ReLU) and x is last_bn_out:
            bn = costs.pop()  # one fused layer: a batch norm and the ReLU on its output
            costs.append(
                _elementwise_cost(f"{bn.name}+relu", "bn+relu", (*bn.paths, path), bn.in_shape,
                                  shape_out, bn.in_shape[0])
            )  # fmt: skip
        else:
            kind = next(k for t, k in ELEMENTWISE_MODULES if isinstance(m, t))
            name = f"{last_conv} {kind}" if kind in ("bn", "relu") else kind
            costs.append(_elementwise_cost(name, kind, (path,), shape_in, shape_out, x.shape[1]))
        last_bn_out = y if isinstance(m, BatchNorm) else None
    return costs


def optimizer_cost(
    model: nn.Module, momentum: float, nesterov: bool, weight_decay: float
) -> LayerCost:
    """SGD's update of every parameter, once a step: an ``sgd`` layer."""
    params = sum(p.numel() for p in model.parameters())
    # Per parameter: p -= lr * d (2); d = g + wd * p (2); buf = m * buf + d (2); with
    # Nesterov d += m * buf (2). Reads p, g and the buffer; writes p and the buffer.
    flops = 2 + 2 * (weight_decay > 0) + 2 * (momentum > 0) + 2 * nesterov
    elements = 3 + 2 * (momentum > 0)
    return LayerCost(
        "sgd", "sgd", (), (params,), step_flops=flops * params, parameters=elements * params,
        input_grad=False,
    )  # fmt: skip


def model_flops_per_image(costs: list[LayerCost]) -> int:
    """Training FLOPs of the conv and linear layers per image: the model FLOPs that MFU
    counts (the elementwise layers' FLOPs are in the roofline, not in MFU)."""
    return sum(c.forward_flops + c.backward_flops for c in costs if c.kind in MATMUL_KINDS)


def training_flops_per_image(model: nn.Module, side: int = 32) -> int:
    return model_flops_per_image(layer_costs(model, side))
