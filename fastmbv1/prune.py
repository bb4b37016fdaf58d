"""``fastmbv1 prune``: remove whole channels with Torch-Pruning, then fine-tune and compare.

Torch-Pruning traces the network into a dependency graph, so one pruning decision removes a
channel everywhere it is used: the BN after a conv, the depthwise conv that consumes it (kept
at groups == channels), the next pointwise conv's inputs, the identity shortcuts that add it
to other blocks, and the classifier's inputs. The pruned network is then rebuilt from its
per-layer widths (``channels=[...]``) so that its saved metadata alone rebuilds it.
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any

import torch
import torch.nn as nn

from fastmbv1.checkpoint import model_from_record, read_checkpoint
from fastmbv1.config import dash, default_eval_batch, read_toml
from fastmbv1.errors import UserError
from fastmbv1.evaluate import evaluate
from fastmbv1.info import IMAGE_SHAPE, batch_seconds, model_cost
from fastmbv1.machine import pick_device
from fastmbv1.metrics import write_json
from fastmbv1.models import build_model
from fastmbv1.plan import make_config
from fastmbv1.step import MODEL_FIELDS
from fastmbv1.tables import Column, render_table
from fastmbv1.train import train
from pipelines import build_pipeline
from pipelines.cifar10 import load_cifar10

# --target-macs prunes in steps of MAX_RATIO / TARGET_STEPS of every layer's channels until
# the MACs fit, so it overshoots the target by at most one step (about 2.5 % of channels).
MAX_RATIO = 0.95
TARGET_STEPS = 38
LATENCY_REPEATS = 20


def check_request(ratio: float | None, target_macs: float | None, macs: int | None = None) -> None:
    """UserError unless exactly one of ``ratio``/``target_macs`` is given, and it is in range.

    ``macs`` is the unpruned network's count; without it only ``target_macs > 0`` is checked.
    """
    if (ratio is None) == (target_macs is None):
        raise UserError("give exactly one of --ratio and --target-macs")
    if ratio is not None and not (math.isfinite(ratio) and 0 < ratio < 1):
        raise UserError(f"--ratio is the fraction of channels to remove, in (0, 1); got {ratio}")
    if target_macs is not None:
        if not (math.isfinite(target_macs) and target_macs > 0):
            raise UserError(f"--target-macs must be > 0, got {target_macs}")
        if macs is not None and target_macs >= macs:
            raise UserError(
                f"--target-macs {target_macs:.0f} is not below the model's {macs:,} MACs"
            )


def layer_channels(model: nn.Module) -> list[int]:
    """The ``channels=[...]`` list of a (pruned) network: its stem's width, then each block's."""
    return [model.stem[0].out_channels] + [
        block.pointwise[0].out_channels for block in model.blocks
    ]


def prune_model(
    model: nn.Module,
    name: str,
    kwargs: dict[str, Any],
    *,
    ratio: float | None = None,
    target_macs: float | None = None,
    example: torch.Tensor | None = None,
) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` (registered as ``name``, built with ``kwargs``) with channels removed.

    ``ratio`` removes that fraction of every layer's channels (those with the smallest L2
    norm, whole dependency groups at a time; Torch-Pruning never empties a layer, so one with
    fewer than 1 / (1 - ratio) channels stays whole); ``target_macs`` removes ever more until
    ``model_cost(...)["macs"] <= target_macs``. Returns a fresh ``build_model(name, **kwargs,
    channels=channels)`` holding the pruned weights, in eval mode, and ``channels``.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise UserError(
            "fastmbv1 prune needs Torch-Pruning: pip install 'fastmbv1[prune]'"
        ) from None
    model = copy.deepcopy(model).cpu().eval()  # eval: tracing must not touch the BN statistics
    before = model_cost(model)["macs"]
    check_request(ratio, target_macs, before)
    example = torch.rand(1, *IMAGE_SHAPE) if example is None else example.cpu()
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=MAX_RATIO if ratio is None else ratio,
        iterative_steps=TARGET_STEPS if ratio is None else 1,
        ignored_layers=[model.classifier],  # its outputs are the 10 classes
    )
    for _ in range(pruner.iterative_steps):
        pruner.step()
        if target_macs is None or model_cost(model)["macs"] <= target_macs:
            break
    else:
        raise UserError(
            f"--target-macs {target_macs:.0f} is out of reach: removing {MAX_RATIO:.0%} of the "
            f"channels leaves {model_cost(model)['macs']:,} of {before:,} MACs"
        )

    channels = layer_channels(model)
    rebuilt = build_model(name, **{**kwargs, "channels": channels}).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        if not torch.allclose(rebuilt(example), model(example), rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{name}(channels={channels}) does not reproduce the pruned model")
    return rebuilt, channels


def accuracy(model: nn.Module, batches, device: torch.device) -> float:
    correct, total = evaluate(model.to(device), batches, device)
    return 100.0 * correct / total


def measure(model: nn.Module, batches, device: torch.device) -> dict[str, Any]:
    """Test accuracy, parameters, MACs and batch-1 latency of ``model`` on ``device``."""
    model = model.to(device).eval()
    cost = model_cost(model)
    return {
        "test_acc": accuracy(model, batches, device),
        "params": cost["params"],
        "macs": cost["macs"],
        "latency_ms": 1000 * batch_seconds(model, device, 1, LATENCY_REPEATS),
    }


def format_table(before: dict, after: dict, pruned_acc: float) -> str:
    """Before against after fine-tuning, one measure a row (each with its own number format)."""
    measures = [
        ("test accuracy %", ".2f", "test_acc"),
        ("parameters", ",", "params"),
        ("MACs / image", ",", "macs"),
        ("latency ms (batch 1)", ".3f", "latency_ms"),
    ]
    rows = [
        {
            "measure": label,
            "before": format(before[key], spec),
            "after": format(after[key], spec),
            "ratio": after[key] / before[key] if before[key] else float("nan"),
        }
        for label, spec, key in measures
    ]
    columns = [
        Column("", "measure"),
        Column("before", "before", justify="right"),
        Column("after", "after", justify="right"),
        Column("after/before", "ratio", spec=".3f"),
    ]
    return (
        render_table(columns, rows)
        + f"\naccuracy right after pruning, before fine-tuning: {pruned_acc:.2f} %"
    )


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Prune the model in ``args.checkpoint``, fine-tune it with ``train``, report the change.

    ``overrides`` are the training flags; with ``args.config`` they set the fine-tuning run's
    config over the checkpoint's preset if it is an original recipe (else ``auto``), while
    the checkpoint decides the network.
    """
    check_request(args.ratio, args.target_macs)
    given = [f"--{dash(f)}" for f in MODEL_FIELDS if f in overrides]
    if given:
        raise UserError(f"{', '.join(given)}: the checkpoint decides the network")
    stored = read_checkpoint(args.checkpoint)
    # A training checkpoint keeps its config beside the model record, final.pt in its meta.
    record = stored.get("model_record", stored)
    trained_with = stored.get("config") or record.get("meta", {}).get("config") or {}
    model = model_from_record(record, args.checkpoint)
    name, kwargs = record["model"], record["kwargs"]
    given = {**(read_toml(args.config) if args.config else {}), **overrides}
    # The trainer takes the network as given; these fields only make config.json say so. A
    # network saved with its depthwise ReLUs records no depthwise_relu (step.build_run).
    architecture = {"model": name, "depthwise_relu": True}
    architecture.update({f: kwargs[f] for f in MODEL_FIELDS if f in kwargs})
    # The original recipes carry over; the fast and cpu ones are what auto picks for a device,
    # and this machine's device may not be the one that trained the checkpoint.
    preset = trained_with.get("preset")
    preset = preset if preset in ("baseline", "custom") else "auto"
    cfg = make_config({"preset": preset, **given, **architecture})

    pruned, channels = prune_model(
        model, name, kwargs, ratio=args.ratio, target_macs=args.target_macs
    )
    pruned_kwargs = {**kwargs, "channels": channels}

    device = pick_device(cfg.device)
    cifar = load_cifar10(cfg.data)
    test_batches = build_pipeline(
        "torch",
        cifar.test_images[: cfg.test_limit],
        cifar.test_labels[: cfg.test_limit],
        batch_size=cfg.eval_batch_size or default_eval_batch(device.type == "cuda", model.views),
        train=False,
        device=device,
        seed=cfg.seed,
    )
    before = measure(model, test_batches, device)
    pruned_acc = accuracy(pruned, test_batches, device)

    result = train(cfg, model=pruned, model_kwargs=pruned_kwargs, overwrite=args.overwrite)
    after = measure(result.model, test_batches, device)
    report = {
        "checkpoint": str(args.checkpoint),
        "model": name,
        "ratio": args.ratio,
        "target_macs": args.target_macs,
        "channels_before": layer_channels(model),
        "channels_after": channels,
        "before": before,
        "after": after,
        "pruned_test_acc": pruned_acc,
        "finetune_epochs": result.summary["epochs_done"],
        "finetune_wall_s": result.summary["wall_s"],
        "final": str(result.out / "final.pt"),
    }
    write_json(result.out / "prune.json", report)
    print(format_table(before, after, pruned_acc))
    print(f"saved {result.out / 'prune.json'}")
    return 0
