"""NVIDIA DALI: the shift, flip and scaling as DALI operators, fed a batch at a time.

The epoch's plan is the one every pipeline draws (``pipelines.sampling``), so for the same
seed and epoch this pipeline returns the torch pipeline's batches bit for bit. On CUDA the
uint8 data set lives on the GPU as a torch tensor; each batch is gathered there and handed to
DALI's GPU operators without a trip through host memory. With ``device_id=None`` the same
graph runs DALI's CPU operators, which is what machines without a GPU (and the tests) use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from pipelines.sampling import PipelineBase, shifts_and_flips

try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as e:  # optional dependency: unavailable() says so, build() is never reached
    MISSING: str | None = f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda120"
else:
    MISSING = None


def unavailable(device: torch.device) -> str | None:
    if MISSING is not None:
        return MISSING
    if device.type not in ("cpu", "cuda"):
        return f"DALI runs on cpu or cuda, not {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def num_threads() -> int:
    """DALI's worker threads in this process: its rank's share of the cores, at most 4.

    torchrun starts ``LOCAL_WORLD_SIZE`` ranks per machine, each with its own DALI pool beside
    torch's intra-op threads, so a pool of ``os.cpu_count()`` threads per rank oversubscribes
    the cores that many times. The cap keeps a large machine from starting dozens of threads
    per rank for the few milliseconds of CPU work a batch of 32x32 images is.
    """
    share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, share))


def augment(train: bool, device: str, half: bool):
    """One batch of HWC uint8 images in, HWC floats in [0, 1] out."""
    images = fn.external_source(name="images", device=device, layout="HWC")
    if train:
        # Per-sample plan from the host: DALI takes argument inputs from CPU memory only.
        anchor = fn.external_source(name="anchor")  # (y, x) = (-dy, -dx), absolute
        mirror = fn.external_source(name="mirror")
        # Integer anchors move the 32x32 window by whole pixels; what falls outside the image
        # reads as zero, which is Pad(4) + RandomCrop(32) without building the padded copy.
        images = fn.slice(
            images, start=anchor, shape=(32, 32), axis_names="HW", out_of_bounds_policy="pad"
        )
        images = fn.flip(images, horizontal=mirror)
    # True division, as torch's x.to(dtype) / 255; crop_mirror_normalize multiplies by a
    # reciprocal instead, which is one ulp off for some values.
    x = images / types.Constant(255.0, dtype=types.FLOAT)
    return fn.cast(x, dtype=types.FLOAT16) if half else x


class DaliPipeline(PipelineBase):
    def __init__(self, images, labels, *, device, dtype, **settings):
        on_gpu = device.type == "cuda"
        if on_gpu and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(len(images), device=device, dtype=dtype, **settings)
        train, batch_size = self.train, self.batch_size
        # (N, 32, 32, 3) uint8. DALI asks torch for a CUDA stream whenever it is fed a torch
        # tensor, so on the host the images stay numpy.
        self.images = torch.tensor(images, device=device) if on_gpu else np.asarray(images)
        self.labels = torch.tensor(labels, dtype=torch.int64, device=device)
        self.pipe = pipeline_def(augment)(
            train=train,
            device="gpu" if on_gpu else "cpu",
            # DALI has no bfloat16: it delivers float32 and torch rounds, as in the torch pipeline.
            half=dtype == torch.float16,
            batch_size=batch_size,
            num_threads=num_threads(),
            device_id=device.index if on_gpu else None,
            # Inputs are fed with each run() call, which needs a queue one batch deep.
            prefetch_queue_depth=1,
            # Outputs in fresh buffers that stay valid after the next run, so torch can take
            # them over through DLPack without a copy.
            exec_dynamic=True,
        )
        self.pipe.build()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch()
        order = self.indices(epoch)
        on_device = torch.as_tensor(order, device=self.device)
        image_order = on_device if self.device.type == "cuda" else order
        if self.train:
            dy, dx, flip = shifts_and_flips(self.n, seed=self.seed, epoch=epoch)
            anchor = np.stack([-dy, -dx], axis=1).astype(np.int32)
            mirror = flip.astype(np.int32)
        # Outputs come back on torch's stream without a host sync; None means CPU.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for start in range(0, len(order), self.batch_size):
            batch = slice(start, start + self.batch_size)
            inputs = {"images": self.images[image_order[batch]]}
            if self.train:
                inputs.update(anchor=anchor[order[batch]], mirror=mirror[order[batch]])
            (out,) = self.pipe.run(stream, **inputs)
            x = torch.from_dlpack(out.as_tensor())
            # (B, 32, 32, 3) contiguous, viewed as (B, 3, 32, 32), is channels_last already.
            yield x.permute(0, 3, 1, 2).to(self.dtype), self.labels[on_device[batch]]


def build(images: np.ndarray, labels: np.ndarray, **settings) -> DaliPipeline:
    return DaliPipeline(images, labels, **settings)
