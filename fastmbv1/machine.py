"""What a run or a measurement ran on: the device, its name, the library versions, memory."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from fastmbv1.errors import UserError


def pick_device(name: str) -> torch.device:
    """``auto``, ``cuda`` or ``cpu`` as a torch device; ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, which runs it synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:  # platform.processor() is empty on most Linux systems; cpuinfo names the model
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def versions() -> dict[str, str | None]:
    # DALI's version from its installed metadata: importing DALI takes seconds, and a run
    # asks for this after its last step, where only the save is left in the budget.
    dali = (d.version for d in metadata.distributions() if d.name.startswith("nvidia-dali"))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": next(dali, None),
    }


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
