"""One config dataclass for a training run, presets as data, TOML files with the same names.

Precedence, lowest first: the dataclass defaults, the preset, ``--config FILE``, the flags.
This module is plain data and its checks: what needs the machine (the preset ``auto``, and
the fields left as ``None``) is decided in ``fastmbv1.plan``, which saves the resolved form,
so ``config.json`` always says what really ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fastmbv1.errors import UserError
from fastmbv1.models import MODELS
from fastmbv1.models.mobilenet import count_views
from pipelines.sampling import MAX_SHIFT


def opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


# Test images per evaluation batch, by device: how fast a batch evaluates depends on the
# machine, not the recipe. On the CPU a batch whose forward outgrows its caches runs slowly:
# with flip TTA a batch of 1,000 test images ran 1.8 to 3.0 times slower than one of 64 (each
# of the hour's evaluations took about 41 s), and with six views the best batches were 16 to 32
# (bench/results/eval-batch-cpu/). So the CPU evaluates about 128 images a forward, TTA's views
# included: 64 test images with flip TTA, 21 with six views. The GPU keeps 1,000 test images
# (not measured on one yet). The batch does not change a score: the model evaluates in eval mode.
EVAL_BATCH = 1000
CPU_EVAL_IMAGES = 128


def default_eval_batch(cuda: bool, views: int) -> int:
    """The evaluation batch, in test images, for a config that leaves it open: on a CUDA GPU
    or not, for a model that looks at ``views`` images per test image."""
    return EVAL_BATCH if cuda else max(1, CPU_EVAL_IMAGES // views)


@dataclass
class TrainConfig:
    preset: str = opt(
        "auto", "recipe: auto (fast on a CUDA GPU, else cpu), fast, cpu, baseline or custom"
    )
    model: str = opt(
        "auto", "network, by registry name; auto: the budget chooses it, with the width (plan.py)"
    )
    width: float | None = opt(
        1.0, "width multiplier for every layer's channels; auto: chosen with the epochs (plan.py)"
    )
    normalize: bool = opt(True, "standardise inputs inside the model (off in the baseline)")
    dropout: float = opt(0.0, "dropout before the classifier")
    depthwise_relu: bool = opt(
        True,
        "a ReLU between each block's depthwise and pointwise convolutions, as the MobileNetV1 "
        "paper has; off, the depthwise output reaches the pointwise conv linearly (Xception)",
    )
    pipeline: str | None = opt(
        None,
        "data pipeline: dali, torch or torchvision (default: dali on a CUDA GPU where it is "
        "installed, else torch)",
    )
    num_workers: int = opt(0, "DataLoader workers for the torchvision pipeline")
    device: str = opt("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    epochs: int | None = opt(
        30, "epochs to train (the budget may end the run sooner); auto: as many as fit the budget"
    )
    batch_size: int = opt(512, "training batch size")
    eval_batch_size: int | None = opt(
        None,
        "evaluation batch size, in test images; auto: 1000 on a CUDA GPU, 128 images a forward "
        "on the CPU (64 with flip TTA, 21 with six views)",
    )
    lr: float = opt(0.4, "peak learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay")
    bn_decay: bool = opt(
        True, "weight decay on batch-norm weights and biases and the classifier's bias too"
    )
    depthwise_decay: float = opt(
        1.0,
        "weight decay on the depthwise filters, as a multiple of --weight-decay (MobileNetV1's "
        "paper puts little or none on them: they have few parameters)",
    )
    bias_lr: float = opt(
        1.0,
        "learning-rate multiplier for the batch-norm and classifier biases; their weight "
        "decay is divided by it, so their decay per step stays the same (airbench's bias "
        "scaler)",
    )
    muon: float = opt(
        0.0,
        "Muon (torch.optim.Muon's update; its Newton-Schulz in fp32 on CPUs without bf16 "
        "instructions) for the pointwise convs' weights, at this multiple of the learning "
        "rate (Muon scales each layer's step by a further sqrt(max(1, C_out/C_in))); SGD "
        "keeps the rest (0: off)",
    )
    bn_momentum: float = opt(
        0.1, "batch-norm running statistics: weight of each new batch (torch's convention)"
    )
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")
    schedule: str = opt(
        "onecycle", "learning-rate schedule", choices=("onecycle", "constant", "exponential")
    )
    warmup: float = opt(0.2, "onecycle: fraction of the run spent warming up")
    lr_decay: float = opt(0.94, "exponential: factor applied to the LR after each epoch")
    mixup: float = opt(0.0, "mixup alpha (0: off)")
    cutmix: float = opt(0.0, "cutmix alpha (0: off)")
    cutout: int = opt(0, "cutout square side in pixels (0: off)")
    translate: int = opt(
        MAX_SHIFT,
        "random crop: shift each training image by up to this many pixels each way (the "
        f"original's Pad({MAX_SHIFT}) and 32-pixel crop is {MAX_SHIFT}; 0: no shift)",
    )
    alt_flip: bool = opt(
        False,
        "flip a random half of the images in even epochs and the other half in odd ones "
        "(airbench's alternating flip) instead of a coin per image and epoch",
    )
    start_side: int = opt(
        32,
        "progressive resizing: train on images this many pixels wide at first, growing "
        "to 32 half way through the schedule (32: off)",
    )
    amp: str | None = opt(
        None, "autocast: bf16, fp16 (with grad scaler) or off", choices=("bf16", "fp16", "off")
    )
    compile: bool | None = opt(None, "torch.compile the model (default: on CUDA only)")
    compile_artifacts: str | None = opt(
        None,
        "file of torch.compile's cache artifacts: loaded before compiling if it exists, else "
        "written once the run has compiled; carries a warm compile to a fresh machine",
    )
    cuda_graphs: bool | None = opt(
        None,
        "capture the training step as a CUDA graph and replay it, one graph per image side "
        "(default: on a CUDA GPU in one process, unless --amp fp16)",
    )
    channels_last: bool = opt(True, "channels_last memory format for model and batches")
    ema: float = opt(
        0.0, "decay per step of an average of the weights that is evaluated and saved (0: off)"
    )
    tta: bool = opt(True, "evaluate and save the model averaging each image with its mirror")
    tta_translate: bool = opt(
        False,
        "with --tta, also average the image moved one pixel up-left and one down-right, each "
        "with its mirror (airbench's six views; the image and its mirror weigh half)",
    )
    whiten: bool = opt(
        False,
        "initialise the stem from the training images' 3x3 patch whitening (half its "
        "channels the top eigenvectors, half their negatives), fitted at start",
    )
    dirac: bool = opt(
        False, "initialise each pointwise conv as the identity where its shape allows"
    )
    budget: float = opt(3600.0, "wall-clock seconds for the whole run, compile and eval included")
    target_acc: float | None = opt(None, "stop once the test accuracy reaches this (percent)")
    eval_every: int | None = opt(
        None,
        "evaluate on the test set every K epochs (default: whenever the evaluations so far stay "
        "under 2 % of the time used; always at the end)",
    )
    sync_bn: bool = opt(False, "SyncBatchNorm across ranks under torchrun")
    rank_timeout: float = opt(
        600.0,
        "under torchrun: seconds a rank waits for the others before it fails with an error (a "
        "crashed, hung or stopped rank); must exceed compiling and writing a checkpoint",
    )
    checkpoint_every: int | None = opt(
        None,
        "save a resumable checkpoint every N epochs (default: each epoch when epochs "
        "take over a minute, else only at the end; 0: only at the end)",
    )
    keep: int = opt(2, "how many of the latest checkpoints to keep")
    train_limit: int | None = opt(None, "use only the first N training images (quick runs)")
    test_limit: int | None = opt(None, "use only the first N test images (quick runs)")
    seed: int = opt(0, "seed for weights, order and augmentation")
    profile_steps: int = opt(
        0, "record N steps of the second epoch with torch.profiler into OUT/trace (0: off)"
    )
    tensorboard: bool = opt(False, "also write the metrics to OUT/tb for TensorBoard")
    out: str | None = opt(None, "output folder (default: runs/<timestamp>)")
    data: str | None = opt(None, "CIFAR-10 archive or folder (default: $FASTMBV1_DATA or cache)")

    def validate(self) -> TrainConfig:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UserError(what)

        need(
            self.model == "auto" or self.model in MODELS,
            f"unknown model {self.model!r}; choose from auto, {', '.join(sorted(MODELS))}",
        )
        for name in ("width", "budget", "lr", "bias_lr", "rank_timeout"):
            value = getattr(self, name)
            need(
                (value is None and name == "width") or (math.isfinite(value) and value > 0),
                f"--{dash(name)} must be > 0, got {value}",
            )
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.profile_steps >= 0, f"--profile-steps must be >= 0, got {self.profile_steps}")
        for name in ("epochs", "eval_batch_size", "eval_every", "train_limit", "test_limit"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{dash(name)} must be >= 1, got {value}")
        for name in ("mixup", "cutmix", "cutout"):
            value = getattr(self, name)
            need(value >= 0, f"--{dash(name)} must be >= 0, got {value}")
        need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        need(
            self.checkpoint_every is None or self.checkpoint_every >= 0,
            f"--checkpoint-every must be >= 0, got {self.checkpoint_every}",
        )
        need(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(
            self.depthwise_decay >= 0,
            f"--depthwise-decay must be >= 0, got {self.depthwise_decay}",
        )
        need(self.muon >= 0, f"--muon must be >= 0, got {self.muon}")
        need(
            not (self.muon and self.amp == "fp16"),
            "--muon: not with --amp fp16, whose grad scaler would neither unscale nor check "
            "the gradients Muon reads; use bf16",
        )
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(0 < self.bn_momentum <= 1, f"--bn-momentum must be in (0, 1], got {self.bn_momentum}")
        need(
            0 <= self.label_smoothing < 1,
            f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}")
        need(8 <= self.start_side <= 32, f"--start-side must be in [8, 32], got {self.start_side}")
        need(
            0 <= self.translate <= MAX_SHIFT,
            f"--translate must be in [0, {MAX_SHIFT}], got {self.translate}",
        )
        need(0 <= self.warmup < 1, f"--warmup must be in [0, 1), got {self.warmup}")
        need(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        need(
            self.target_acc is None or 0 < self.target_acc <= 100,
            f"--target-acc is a percentage in (0, 100], got {self.target_acc}",
        )
        need(not (self.nesterov and self.momentum == 0), "--nesterov needs --momentum > 0")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            need(
                choices is None or value is None or value in choices,
                f"--{dash(f.name)} must be one of {', '.join(choices or ())}, got {value!r}",
            )
        return self

    @property
    def eval_views(self) -> int:
        """Images the saved model looks at per test image: itself, its mirror, the shifts."""
        return count_views(self.tta, self.tta_translate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets are data: field overrides on top of the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # GPU-oriented default: Nesterov SGD, OneCycle, label smoothing, big batches. Of the levers
    # the cpu recipe took over it has the one that leaves the weights alone, the saved model's
    # six views, which scored more on the same weights in every run measured (+0.26 to +0.80,
    # bench/results/ab-cpu-recipe.md) for an evaluation a GPU does in moments. The others
    # change training and paid in runs of 5 to 8 epochs, not yet measured in the 30 of this.
    "fast": {"model": "mobilenet_v1", "tta_translate": True},
    # The same recipe sized for a 2-core CPU and minutes: the network (CustomMobileNet for an
    # hour, else half- or quarter-width MobileNetV1) and as many epochs as the budget fits at
    # the speed measured at start (plan.py), smaller batches for more steps in the few epochs
    # that fit. Pointwise convs start as the identity: +4.0 points at width 0.25 in 5 epochs,
    # two seeds each. The saved model averages six views (mirror x 1-pixel shifts): on the
    # same weights +0.63 points at width 0.25 x 5 epochs and +0.29 at 0.5 x 8, two seeds each,
    # for an evaluation 2-3 times as long. Shifts of up to 2 pixels, not 4, and no ReLU after
    # the depthwise convs: together +3.94 points at width 0.25 x 5 and +2.04 at 0.5 x 8, two
    # seeds each (bench/results/ab-cpu-recipe.md). CustomMobileNet, which the hour takes where
    # the machine fits 24 of its epochs, gained less from them: 85.77 % at 0.5 x 8 with six
    # views, against 85.17 with neither and flip TTA (one seed). The stem starts from the
    # training images' patch whitening: +0.30 points on the mean of eight pairs (two seeds at
    # 0.25 x 5 and 0.5 x 8, each on one thread and on two; +0.14 at half width), for about
    # half a second of the budget; the stem has 16 and 8 channels there (8 and 4 components).
    # No weight decay on the depthwise filters (the MobileNetV1 paper's advice): +0.40 points
    # at 0.5 x 8 (+0.25, +0.55) and -0.03 at 0.25 x 5 (+0.19, -0.25), two seeds each on two
    # threads. The training loss was lower at every epoch of all four runs: in so few epochs
    # the network underfits, and less decay lets it fit more.
    "cpu": {
        "width": None,
        "batch_size": 128,
        "lr": 0.2,
        "epochs": None,
        "budget": 600.0,
        "dirac": True,
        "tta_translate": True,
        "translate": 2,
        "depthwise_relu": False,
        "whiten": True,
        "depthwise_decay": 0.0,
    },
    # The original project's CustomMobileNet recipe, field for field (facts.md).
    "custom": {
        "model": "custom_mobilenet",
        "width": 1.0,
        "normalize": False,
        "dropout": 0.5,
        "pipeline": "torchvision",
        "num_workers": 0,
        "epochs": 105,
        "batch_size": 500,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 2.5e-3,
        "label_smoothing": 0.0,
        "schedule": "exponential",
        "lr_decay": 0.94,
        "mixup": 1.0,
        "amp": "off",
        "compile": False,
        "channels_last": False,
        "tta": False,
    },
    # The original project's baseline, field for field (../shared/reference/facts.md).
    "baseline": {
        "model": "mobilenet_v1",
        "width": 1.0,
        "normalize": False,
        "dropout": 0.0,
        "pipeline": "torchvision",
        "num_workers": 0,
        "epochs": 100,
        "batch_size": 100,
        "lr": 0.03,
        "momentum": 0.0,
        "nesterov": False,
        "weight_decay": 5e-4,
        "label_smoothing": 0.0,
        "schedule": "constant",
        "amp": "off",
        "compile": False,
        "channels_last": False,
        "tta": False,
    },
}


# Fields a resumed run may change: they decide when it stops or what it writes, not the recipe.
SAFE_ON_RESUME = {
    "budget", "eval_every", "target_acc", "checkpoint_every", "keep", "data", "profile_steps",
    "tensorboard", "compile_artifacts", "rank_timeout",
}  # fmt: skip


def dash(name: str) -> str:
    return name.replace("_", "-")


def field_type(name: str) -> type:
    """The plain type of a TrainConfig field: ``float`` for ``float | None`` too."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    return hint


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def load_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's tables, or a one-line UserError naming ``what`` and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path} is not valid TOML: {e}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file: TrainConfig field names only."""
    data = load_toml(path)
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise UserError(f"config file {path}: unknown field(s) {', '.join(unknown)}")
    return data


def settings(overrides: dict[str, Any], config_file: str | None = None) -> dict[str, Any]:
    """The fields a run sets: the TOML file's, then the flags over them."""
    return {**(read_toml(config_file) if config_file else {}), **overrides}


def merge(given: dict[str, Any], preset: str) -> TrainConfig:
    """Defaults <- ``preset`` <- ``given`` (the settings), type-checked and validated.

    ``preset`` is a concrete preset: ``fastmbv1.plan.make_config`` resolves ``auto`` first.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from auto, {', '.join(PRESETS)}")
    merged = {**PRESETS[preset], **given, "preset": preset}
    for name, value in merged.items():
        merged[name] = _coerce(name, value, field_type(name))
    return TrainConfig(**merged).validate()


def resumed_settings(run_dir: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run in ``run_dir``, with only the flags that are safe to change."""
    path = Path(run_dir) / "config.json"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--resume {run_dir}: no config.json, not a fastmbv1 run folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume {run_dir}: unreadable config.json ({e})") from None
    stored.pop(WHY, None)
    # "auto" (--model auto, --preset auto, a tune's best.toml) asks for what the run chose,
    # which its config.json holds.
    overrides = {name: value for name, value in overrides.items() if value != "auto"}
    for name, value in overrides.items():
        if name not in SAFE_ON_RESUME and value != stored.get(name):
            raise UserError(
                f"--{dash(name)} {value} differs from the run being resumed ({stored.get(name)});"
                f" on resume only {', '.join('--' + dash(n) for n in sorted(SAFE_ON_RESUME))}"
                " may change"
            )
    # A field added after the run started is missing from its config.json. The run had the
    # behaviour from before the field, which is the field's default, not what a preset now sets.
    missing = {f.name: f.default for f in fields(TrainConfig) if f.name not in stored}
    return {**missing, **stored, **overrides}


# config.json keeps, beside the fields, why the machine-dependent ones got their values.
WHY = "why"

# Widths a run without --width chooses from, widest first (fastmbv1.plan weighs them against
# the budget). Half width runs at about 42 % of quarter width's images/s on the 2-core CPU but
# learns more per epoch. At equal time, with flip TTA (bench/results/ab-cpu-recipe.md): 12
# epochs of it 85.66 % against 83.78 for 24 of quarter width; 8 of it 84.44 against about
# 83.3 for the 19 that take as long (between the 12 and 24 measured).
WIDTHS = (0.5, 0.25)
# The network of a run that leaves --model as auto, unless the budget fits enough epochs of a
# bigger one (fastmbv1.plan.SIZES).
DEFAULT_MODEL = "mobilenet_v1"


def narrowest(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with an automatic model and width set to the smallest choice, for a run whose
    epochs are given (nothing to weigh them against) and for benches that time a preset."""
    model = DEFAULT_MODEL if cfg.model == "auto" else cfg.model
    return replace(cfg, model=model, width=WIDTHS[-1] if cfg.width is None else cfg.width)


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Check a value from a TOML file against the field's type (ints pass as floats)."""
    if value is None:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise UserError(f"{name} must be of type {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value
