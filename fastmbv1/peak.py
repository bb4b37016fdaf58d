"""This machine's limits, measured: matmul FLOP/s per dtype and memory bandwidth, cached.

MFU and the roofline need the hardware's peaks. For a named GPU a datasheet gives them
(``fastmbv1.measure.gpus``); here they are measured: a square matmul in the step's dtype,
and a copy between two buffers of ``COPY_BYTES`` (1 GiB) each, far larger than any
last-level cache (32 MiB on the project's CPU), counted as bytes read plus bytes written
(STREAM's copy convention). Each figure is the best of a few repeats.

Measuring takes seconds, so the figures are cached once per machine in
``<cache>/peaks.json``, where the cache folder is the data set's (``$FASTMBV1_CACHE`` or
``~/.cache/fastmbv1``), keyed by the device's name, torch's version and, on a CPU, the
threads torch uses. The cache keeps the highest figure measured: a peak is what the machine
can do, and a reading taken while other work shared the machine is lower. The bench
measures and refreshes it; a training run only reads it and never pays for a measurement.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch

from fastmbv1.machine import device_name, sync
from fastmbv1.metrics import write_json
from pipelines.cifar10 import default_cache_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Each of the copy's two buffers: far beyond any cache, so the copy runs from memory.
COPY_BYTES = 2**30
# The matmul's side: seconds' work at most, but large enough to reach the peak.
MATMUL_SIDE = {"cpu": 2048, "cuda": 8192}
REPEATS = 5
CACHE_FILE = "peaks.json"


def step_dtype(amp: str | None) -> str:
    """The dtype a step's convolutions run in under ``--amp``: fp32, bf16 or fp16."""
    return "fp32" if amp in (None, "off") else amp


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one untimed call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@contextmanager
def tf32_as_convolutions(device: torch.device, dtype: str):
    """On CUDA, float32 convolutions use TF32 by default (cuDNN) but matmuls do not: the
    matmul gets the convolutions' setting, so that its peak is the one they can reach."""
    if device.type != "cuda" or dtype != "fp32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_flops(device: torch.device, dtype: str, side: int | None = None) -> float:
    """FLOP/s of a square matmul in ``dtype`` (2 n^3 FLOPs), best of a few."""
    n = side or MATMUL_SIDE[device.type]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, DTYPES[dtype]) for _ in range(2))
    with tf32_as_convolutions(device, dtype):
        return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of copying one buffer of ``nbytes`` into another, read plus written."""
    src = torch.ones((nbytes or COPY_BYTES) // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: dst.copy_(src), device)


def machine_key(device: torch.device) -> str:
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{device_name(device)} ({device.type}{threads}), torch {torch.__version__}"


def cache_file() -> Path:
    return default_cache_dir() / CACHE_FILE


def read_cache() -> dict:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: as good as none
        return {}
    return cache if isinstance(cache, dict) else {}


def cached_peaks(device: torch.device) -> dict:
    """``{"flops": {dtype: {"flops_per_s", "measured"}}, "bandwidth": {"bytes_per_s", ...}}``
    as cached for this machine (empty where nothing was measured yet)."""
    entry = read_cache().get(machine_key(device), {})
    return entry if isinstance(entry, dict) else {}


def cached_peak(device: torch.device, dtype: str) -> dict | None:
    """The highest matmul FLOP/s cached for this machine in ``dtype``, or None."""
    return cached_peaks(device).get("flops", {}).get(dtype)


def remember(device: torch.device, flops: dict[str, float], bandwidth: float | None) -> None:
    """Put the figures measured now into the cache where they beat the cached ones."""
    now = datetime.now().isoformat(timespec="seconds")
    cache = read_cache()
    entry = cache.setdefault(machine_key(device), {})
    for dtype, value in flops.items():
        old = entry.setdefault("flops", {}).get(dtype)
        if old is None or value > old["flops_per_s"]:
            entry["flops"][dtype] = {"flops_per_s": value, "measured": now}
    old = entry.get("bandwidth")
    if bandwidth is not None and (old is None or bandwidth > old["bytes_per_s"]):
        entry["bandwidth"] = {"bytes_per_s": bandwidth, "measured": now, "buffer_bytes": COPY_BYTES}
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file(), cache)
    except OSError as e:  # the figures measured now still serve this command
        print(f"warning: {cache_file()} not written ({e.strerror})", file=sys.stderr)


def measure_peaks(device: torch.device, dtypes: list[str]) -> dict:
    """Matmul FLOP/s in each of ``dtypes`` and the copy bandwidth, measured now and cached:
    ``{"flops": {dtype: FLOP/s}, "bandwidth": bytes/s, "buffer_bytes": each copy buffer}``."""
    flops = {dtype: matmul_flops(device, dtype) for dtype in dict.fromkeys(dtypes)}
    bandwidth = copy_bandwidth(device)
    remember(device, flops, bandwidth)
    return {"flops": flops, "bandwidth": bandwidth, "buffer_bytes": COPY_BYTES}
