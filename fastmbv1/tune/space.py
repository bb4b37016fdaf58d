"""The search space: which config fields a study searches, over which Optuna distribution.

A space file is TOML: one table per searched field, holding ``type`` and the arguments of
that Optuna distribution, and a ``[fixed]`` table of plain values for every trial::

    [lr]                      # FloatDistribution(low, high, log=False, step=None)
    type = "float"
    low = 0.01
    high = 1.0
    log = true
    [epochs]                  # IntDistribution(low, high, log=False, step=1)
    type = "int"
    low = 3
    high = 20
    [batch_size]              # CategoricalDistribution(choices)
    type = "categorical"
    choices = [128, 256]
    [fixed]
    preset = "cpu"

Optuna checks the arguments (low <= high, log needs low > 0 and no step, ...); a config
built from every range end and choice checks the values (``check_space``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from fastmbv1.config import field_names, field_type, load_toml
from fastmbv1.errors import UserError, one_line
from fastmbv1.machine import pick_device
from fastmbv1.plan import make_config
from pipelines import available

# Fields fastmbv1 tune sets itself; a space may neither search nor fix them.
TUNER_FIELDS = ("out", "data", "budget", "target_acc", "eval_every", "seed")
DISTRIBUTIONS = {
    "float": FloatDistribution,
    "int": IntDistribution,
    "categorical": CategoricalDistribution,
}


@dataclass
class Space:
    params: dict[str, BaseDistribution]
    fixed: dict[str, Any] = field(default_factory=dict)

    def draw(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's value for each searched field (Optuna suggests per distribution kind)."""
        values = {}
        for name, d in self.params.items():
            if isinstance(d, CategoricalDistribution):
                values[name] = trial.suggest_categorical(name, d.choices)
            elif isinstance(d, IntDistribution):
                values[name] = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
            else:
                values[name] = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
        return values

    def outside(self, values: dict[str, Any]) -> str | None:
        """The first searched field whose value the space cannot draw (out of range, off
        its step, not a choice, or None: auto), else None. Optuna would run such a value
        as a fixed parameter, but warn, and record what its sampler cannot reproduce."""
        for name, d in self.params.items():
            try:
                # What Optuna itself checks fixed parameters with.
                if not d._contains(d.to_internal_repr(values[name])):
                    return name
            except (ValueError, TypeError):
                return name
        return None


def extremes(d: BaseDistribution) -> tuple:
    """The values that bound what ``d`` can draw: its choices, or its range's two ends."""
    return d.choices if isinstance(d, CategoricalDistribution) else (d.low, d.high)


def default_space(device: str) -> Space:
    """The built-in search, over the pipelines that run on ``device`` ("auto", "cuda", "cpu")."""
    usable = tuple(n for n, why in available(pick_device(device)).items() if why is None)
    return Space(
        {
            "batch_size": CategoricalDistribution((128, 256, 512)),
            "lr": FloatDistribution(0.02, 1.0, log=True),
            "warmup": FloatDistribution(0.05, 0.4),
            "momentum": FloatDistribution(0.8, 0.95),
            "weight_decay": FloatDistribution(1e-5, 1e-3, log=True),
            "label_smoothing": FloatDistribution(0.0, 0.2),
            "width": CategoricalDistribution((0.25, 0.5, 0.75, 1.0)),
            "epochs": IntDistribution(3, 30),
            "mixup": CategoricalDistribution((0.0, 0.2)),
            "pipeline": CategoricalDistribution(usable),
        }
    )


def read_space(path: str | Path) -> Space:
    """A search space from a TOML file (see the module's docstring)."""
    path = Path(path)
    tables = load_toml(path, "space file")

    def bad(what: str) -> UserError:
        return UserError(f"space file {path}: {what}")

    fixed = tables.pop("fixed", {})
    if not isinstance(fixed, dict):
        raise bad("[fixed] must be a table of field = value")
    for name in (*fixed, *tables):
        if name not in field_names():
            raise bad(f"unknown field {name!r} (not a training config field)")
        if name in TUNER_FIELDS:
            raise bad(f"{name} is set by fastmbv1 tune itself, not by the space")
    params = {}
    for name, spec in tables.items():
        if name in fixed:
            raise bad(f"{name} is both searched and in [fixed]")
        if not isinstance(spec, dict):
            raise bad(f"{name} must be a table ([{name}] type = ...)")
        kind = spec.pop("type", None)
        if kind not in DISTRIBUTIONS:
            raise bad(f"[{name}] type must be float, int or categorical, got {kind!r}")
        typed = field_type(name).__name__
        if kind != "categorical" and kind != typed:
            raise bad(f"[{name}] is a field of type {typed}; type {kind} cannot search it")
        # IntDistribution would truncate 2.5 to 2 without a word (it calls int()).
        if kind == "int" and not all(type(spec.get(k, 1)) is int for k in ("low", "high", "step")):
            raise bad(f"[{name}] low, high and step of an int range must be integers")
        try:
            params[name] = DISTRIBUTIONS[kind](**spec)
        except (TypeError, ValueError) as e:
            raise bad(f"[{name}] is no valid {kind} distribution: {one_line(e)}") from None
    return Space(params, fixed)


def check_space(
    space: Space, settings: dict[str, Any], config_file: str | None, where: str
) -> None:
    """Build a config from every range end and choice, so a bad value fails before any trial."""
    for name, d in space.params.items():
        for value in extremes(d):
            try:
                make_config({**settings, name: value}, config_file)
            except UserError as e:
                raise UserError(f"{where}: {name} = {value!r}: {e}") from None
