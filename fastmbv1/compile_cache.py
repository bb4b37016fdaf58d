"""What torch.compile cost a run, and what it can expect to cost: its caches, made visible.

Inductor keeps compiled graphs in a cache folder (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``), and AOTAutograd beside them, so a second run of the same
setting on the same machine skips most of the work. ``CompileCache`` counts the hits and
misses of one run's compile, and keeps in that same folder a small record per setting
(``RECORD``) of the cold and warm compile seconds and of the step time with and without
compiling, which ``fastmbv1.plan`` weighs against the budget before the next run compiles.
A fresh machine starts with an empty folder: ``--compile-artifacts FILE`` carries one over
(``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``): the file is loaded
before compiling when it exists, and written once the run has compiled when it does not.
On CUDA the artifacts hold the Triton kernels' binaries; on the CPU they spare the graph's
lowering but gcc still compiles its C++ kernels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastmbv1.config import TrainConfig
from fastmbv1.errors import UserError
from fastmbv1.machine import device_name

RECORD = "fastmbv1-compile-times.json"
# (counter group, counter, our name): lookups in Inductor's FX-graph cache and
# AOTAutograd's cache.
COUNTED = (
    ("inductor", "fxgraph_cache_hit", "fxgraph_hits"),
    ("inductor", "fxgraph_cache_miss", "fxgraph_misses"),
    ("aot_autograd", "autograd_cache_hit", "aot_hits"),
    ("aot_autograd", "autograd_cache_miss", "aot_misses"),
)


def setting_key(cfg: TrainConfig, device: torch.device, batch_size: int) -> str:
    """What decides the compiled graphs (and the step time) of a run on this machine."""
    parts = (
        cfg.model, f"width={cfg.width:g}", f"batch={batch_size}", f"amp={cfg.amp}",
        f"channels_last={cfg.channels_last}", f"cuda_graphs={cfg.cuda_graphs}",
        f"tta={cfg.tta}", device_name(device), f"torch={torch.__version__}",
    )  # fmt: skip
    return " ".join(map(str, parts))


# torch._dynamo and torch._inductor take seconds to import, which every command (even
# `fastmbv1 --help`) would pay at start: they are imported where a compiled run needs them.
def cache_dir() -> str:
    """Inductor's cache folder (created if missing)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def snapshot() -> dict[str, int]:
    """The cache lookups counted so far in this process."""
    from torch._dynamo.utils import counters

    return {name: counters[group][counter] for group, counter, name in COUNTED}


def read_record(key: str) -> dict:
    """This machine's record for setting ``key``: ``cold_s``, ``warm_s``, ``compiled_step_s``,
    ``eager_step_s``, each where a run has measured it (an empty dict if none has)."""
    try:
        return json.loads((Path(cache_dir()) / RECORD).read_text()).get(key, {})
    except (OSError, ValueError):
        return {}


def update_record(key: str, **values: float) -> dict:
    """Set ``values`` in the record of ``key`` (atomically) and return the record."""
    path = Path(cache_dir()) / RECORD
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    records.setdefault(key, {}).update(values)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)
    return records[key]


class CompileCache:
    """One run's view of the compile caches: artifacts loaded at start, cache lookups counted
    from ``start`` on, and the record of its setting updated when it ``finish``es."""

    def __init__(self, cfg: TrainConfig, device: torch.device, batch_size: int):
        self.cfg, self.key = cfg, setting_key(cfg, device, batch_size)
        self.cuda = device.type == "cuda"
        self.artifacts = Path(cfg.compile_artifacts) if cfg.compile_artifacts else None
        self.loaded: int | None = None  # artifacts loaded at start
        self.saved: int | None = None  # bytes of artifacts written after compiling
        if cfg.compile and self.artifacts is not None and self.artifacts.is_file():
            try:
                raw = self.artifacts.read_bytes()
            except OSError as e:
                raise UserError(f"--compile-artifacts {self.artifacts}: {e.strerror}") from None
            info = torch.compiler.load_cache_artifacts(raw)  # None if they do not unpack
            self.loaded = sum(len(keys) for keys in info.artifacts.values()) if info else 0
        self.before = snapshot() if cfg.compile else {}

    def compiled(self) -> None:
        """After the run's graphs are compiled: write the artifacts file if it is wanted."""
        if self.cfg.compile and self.artifacts is not None and self.loaded is None:
            result = torch.compiler.save_cache_artifacts()
            if result is None:
                return
            try:
                self.artifacts.parent.mkdir(parents=True, exist_ok=True)
                self.artifacts.write_bytes(result[0])
                self.saved = len(result[0])
            except OSError as e:  # the run itself is fine: say so and go on
                print(f"warning: --compile-artifacts {self.artifacts}: {e.strerror}", flush=True)

    def finish(self, compile_s: float, step_s: float | None) -> dict:
        """Record this run in its setting's record; summary.json's ``compile`` entry.

        ``compile_s``: the first step and warm-up beyond a steady step; ``step_s``: a steady
        step's seconds (None if the run took too few steps to tell).
        """
        if not self.cfg.compile:
            # An eager step's time only serves the decision to compile on CUDA (plan.py).
            record = update_record(self.key, eager_step_s=step_s) if step_s and self.cuda else {}
            return {"compiled": False, **record}
        looked = {name: n - self.before[name] for name, n in snapshot().items()}
        found = (looked["fxgraph_hits"] > 0, looked["fxgraph_misses"] > 0)
        # "none": no Inductor graph was looked up (another backend compiled).
        cache = {(True, False): "hit", (False, True): "miss", (True, True): "partial"}.get(
            found, "none"
        )
        measured = {"warm_s" if cache == "hit" else "cold_s": compile_s}
        if step_s:
            measured["compiled_step_s"] = step_s
        record = update_record(self.key, **measured)
        summary = {"compiled": True, "cache": cache, "seconds": compile_s, **looked, **record}
        summary["cache_dir"] = cache_dir()
        if self.artifacts is not None:
            summary["artifacts"] = str(self.artifacts)
            summary["artifacts_loaded"], summary["artifacts_saved_bytes"] = self.loaded, self.saved
        return summary
