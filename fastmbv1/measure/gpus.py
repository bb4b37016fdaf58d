"""GPUs as the roofline sees them: peak FLOP/s per dtype, memory bandwidth, launch latency.

The named cards' peaks are NVIDIA's published figures for dense arithmetic (the datasheets
print tensor-core figures "with sparsity", twice the dense ones; these are halved). ``tf32``
is what float32 convolutions reach on cards that have it: cuDNN uses TF32 by default. A
card without a dtype (the T4 has no bf16 units) is modelled at its fp32 rate for it.

The kernel-launch latency is no datasheet figure: 5 microseconds is an assumption, about
what a CUDA launch from PyTorch costs the host. ``--spec FILE`` sets all three for any card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastmbv1.config import load_toml
from fastmbv1.errors import UserError

TERA = 1e12
LAUNCH_LATENCY_S = 5e-6  # assumed, not published (see above)


@dataclass(frozen=True)
class Card:
    name: str
    peak_flops: dict[str, float]  # FLOP/s by dtype: fp32, tf32, bf16, fp16
    bandwidth: float  # bytes/s of device memory
    launch_latency_s: float = LAUNCH_LATENCY_S

    def peak(self, dtype: str) -> tuple[float, str]:
        """FLOP/s that ``dtype`` convolutions can reach, and which figure it is: float32
        takes TF32's where the card has it, and a dtype the card lacks its fp32 rate."""
        chosen = "tf32" if dtype == "fp32" and "tf32" in self.peak_flops else dtype
        chosen = chosen if chosen in self.peak_flops else "fp32"
        return self.peak_flops[chosen], chosen


GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TFLOPS; TF32 989, BF16 and
    # FP16 1,979 TFLOPS with sparsity (dense: half); GPU memory bandwidth 3.35 TB/s.
    "h100": Card(
        "NVIDIA H100 SXM (datasheet)",
        {"fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA, "fp16": 989.5 * TERA},
        3.35 * TERA,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: the H100's compute (FP32 67; TF32 989,
    # BF16/FP16 1,979 TFLOPS with sparsity); 141 GB of HBM3e at 4.8 TB/s.
    "h200": Card(
        "NVIDIA H200 SXM (datasheet)",
        {"fp32": 67 * TERA, "tf32": 494.5 * TERA, "bf16": 989.5 * TERA, "fp16": 989.5 * TERA},
        4.8 * TERA,
    ),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5 TFLOPS; TF32 156, BF16 and FP16 312
    # TFLOPS (dense; 312 / 624 with sparsity); A100 80GB SXM memory bandwidth 2,039 GB/s.
    "a100": Card(
        "NVIDIA A100 SXM 80GB (datasheet)",
        {"fp32": 19.5 * TERA, "tf32": 156 * TERA, "bf16": 312 * TERA, "fp16": 312 * TERA},
        2.039 * TERA,
    ),
    # NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1 TFLOPS, mixed precision (FP16/FP32) 65
    # TFLOPS; GDDR6 at 320+ GB/s. Turing has neither TF32 nor bf16 units.
    "t4": Card("NVIDIA T4 (datasheet)", {"fp32": 8.1 * TERA, "fp16": 65 * TERA}, 320e9),
}

SPEC_HELP = "see fastmbv1 bench roofline --help for the file's form"


def read_spec(path: str) -> Card:
    """A card from a TOML file: ``name``, ``bandwidth`` (bytes/s), ``launch_latency`` (s)
    and a ``[peak_flops]`` table of FLOP/s by dtype (fp32 at least)."""
    spec = load_toml(path, "--spec file")

    def positive(value, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"--spec {path}: {what} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--spec {path}: {what} must be > 0, got {value}")
        return float(value)

    missing = [k for k in ("bandwidth", "peak_flops") if k not in spec]
    if missing:
        raise UserError(f"--spec {path}: needs {', '.join(missing)} ({SPEC_HELP})")
    peaks = spec["peak_flops"]
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        raise UserError(f"--spec {path}: [peak_flops] needs fp32 at least ({SPEC_HELP})")
    unknown = set(peaks) - {"fp32", "tf32", "bf16", "fp16"}
    if unknown:
        raise UserError(f"--spec {path}: unknown dtype(s) {', '.join(sorted(unknown))}")
    return Card(
        str(spec.get("name", path)),
        {k: positive(v, f"peak_flops.{k}") for k, v in peaks.items()},
        positive(spec["bandwidth"], "bandwidth"),
        positive(spec.get("launch_latency", LAUNCH_LATENCY_S), "launch_latency"),
    )
