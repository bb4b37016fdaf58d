"""NVIDIA DALI: each sample's shift and flip as one DALI operator, a chunk ahead of training.

The epoch's plan is the one every pipeline draws (``pipelines.sampling``), and the scaling to
[0, 1] divides as the torch pipeline's ``x.to(dtype).div_(255)`` does on the same device (see
``scales_in_dali``), so for the same seed and epoch this pipeline returns the torch pipeline's
batches bit for bit. On CUDA the uint8 data set lives on the GPU as a torch tensor; each batch
is gathered there and handed to DALI's GPU operators without a trip through host memory, and
comes back on torch's current stream without a host sync. With ``device_id=None`` the same
graph runs DALI's CPU operators, which is what machines without a GPU (and the tests) use.

One DALI run augments a chunk of ``chunk`` batches (``CHUNK_BATCHES`` by default), and the
batches handed over are slices of it. A run costs the host the same whatever its size
(feeding inputs, scheduling, collecting, taking the output over), so per batch it costs
1/chunk of that: a training step, launch-bound already, waits for it once a chunk rather
than every step. DALI works on chunk k + 1 while the caller works through chunk k: each
chunk is collected, the next one is scheduled, then its batches are handed over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from fastmbv1.errors import UserError
from pipelines.sampling import PipelineBase

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.data_node import DataNode
except ImportError as e:  # optional dependency: unavailable() says so, build() is never reached
    MISSING: str | None = f"NVIDIA DALI is not installed ({e}); pip install nvidia-dali-cuda120"
else:
    MISSING = None


# Batches per DALI run; an option (``chunk``) so that the bench can compare run sizes.
CHUNK_BATCHES = 16
OPTIONS = ("chunk",)


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


def affine_maps(dy: np.ndarray, dx: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """(n, 2, 3) maps from output to input pixel centres (x, y): output column c reads input
    column c - dx, or 31 - c - dx where flipped, and row r reads row r - dy."""
    maps = np.zeros((len(dy), 2, 3), dtype=np.float32)
    maps[:, 0, 0] = np.where(flip, -1, 1)
    maps[:, 0, 2] = np.where(flip, 32, 0) - dx  # centre c + 0.5 -> 32 - (c + 0.5) - dx
    maps[:, 1, 1] = 1
    maps[:, 1, 2] = -dy
    return maps


def scales_in_dali(device: torch.device) -> bool:
    """Whether DALI divides by 255 (on the CPU) or hands uint8 to torch to do it (on CUDA).

    On CUDA torch divides by a scalar as a multiplication by its reciprocal, which DALI's
    division would not match bit for bit, so torch's own op scales there (one fused kernel).
    On the CPU both divide truly and agree, and DALI's pool does it: a torch op on a whole
    batch is an OpenMP region, which stalls whenever another process holds a core (beside a
    niced training run, x.sum() of a batch of 512 took 15.6 us per image on two threads
    against 0.17 on one).
    """
    return device.type == "cpu"


def augment(train: bool, device: str, scale: bool) -> DataNode:
    """One batch of HWC uint8 images in, the same shifted and maybe mirrored out: floats in
    [0, 1] if ``scale``, else still uint8."""
    images = fn.external_source(name="images", device=device, layout="HWC")
    if train:
        # Pad(4) + RandomCrop(32) + flip as one operator, since on the CPU each operator costs
        # microseconds per 32x32 sample: the maps send pixel centres to pixel centres, so
        # nearest-neighbour sampling reads whole pixels, and what falls outside reads as zero.
        # The maps come from the host: DALI takes argument inputs from CPU memory only.
        images = fn.warp_affine(
            images,
            matrix=fn.external_source(name="matrix"),
            size=(32, 32),
            inverse_map=True,
            interp_type=types.INTERP_NN,
            fill_value=0,
        )
    return images / types.Constant(255.0, dtype=types.FLOAT) if scale else images


class DaliPipeline(PipelineBase):
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        device: torch.device,
        chunk: int = CHUNK_BATCHES,
        **settings,
    ) -> None:
        if chunk < 1:
            raise UserError(f"DALI's chunk must be at least 1 batch, got {chunk}")
        on_gpu = device.type == "cuda"
        if on_gpu and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(len(images), device=device, **settings)
        self.chunk = chunk
        # (N, 32, 32, 3) uint8. DALI asks torch for a CUDA stream whenever it is fed a torch
        # tensor, so on the host the images stay numpy.
        self.images = torch.tensor(images, device=device) if on_gpu else images
        self.labels = torch.tensor(labels, dtype=torch.int64, device=device)
        self.pipe = pipeline_def(augment)(
            train=self.train,
            device="gpu" if on_gpu else "cpu",
            scale=scales_in_dali(device),
            batch_size=self.batch_size * chunk,  # DALI's batch is our chunk
            num_threads=num_threads(),
            device_id=device.index if on_gpu else None,
            # Each chunk's inputs are fed just before its run is scheduled, which needs an
            # input queue one run deep; running ahead is __iter__'s doing.
            prefetch_queue_depth=1,
            # Outputs in fresh buffers that stay valid after the next run, so torch can take
            # them over through DLPack without a copy.
            exec_dynamic=True,
        )
        self.pipe.build()
        self.scheduled = 0  # runs whose chunks nobody has collected yet
        self.owner: object | None = None  # the epoch (generator) the pipeline works for

    def stream(self) -> torch.cuda.Stream | None:
        """Torch's current stream, on which DALI copies inputs and delivers outputs; None on
        the CPU, where outputs are ready when returned."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def collect(self) -> torch.Tensor:
        """The oldest scheduled chunk as (N, 3, 32, 32) floats in [0, 1], channels_last."""
        (out,) = self.pipe.outputs(self.stream())
        self.scheduled -= 1
        # (B, 32, 32, 3) contiguous, viewed as (B, 3, 32, 32), is channels_last already.
        x = torch.from_dlpack(out.as_tensor()).permute(0, 3, 1, 2)
        if x.is_floating_point():  # scaled by DALI, on the CPU only (see scales_in_dali)
            # DALI has no bfloat16: it delivers float32 and torch rounds, as in the torch
            # pipeline.
            return x.to(self.dtype)
        # Scaled by the torch pipeline's own op, into torch's memory. The read of DALI's
        # buffer is queued on torch's stream before `out` and `x` let go of it on return;
        # DALI then frees the buffer in that stream's order (outputs() gave it that order) or
        # makes its own freeing wait for that stream, so no later run reuses it too early.
        return x.to(self.dtype).div_(255)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.next_epoch()
        owner = self.owner = object()
        # An epoch left part way (the trainer breaks out when its time is up) leaves its next
        # batch scheduled; nobody will take it now.
        while self.scheduled:
            self.pipe.outputs(self.stream())
            self.scheduled -= 1
        order = self.indices(epoch)
        on_device = torch.as_tensor(order, device=self.device)
        image_order = on_device if self.device.type == "cuda" else order
        maps = None
        if self.train:
            maps = affine_maps(*self.shifts_and_flips(epoch))
        step = self.batch_size * self.chunk
        chunks = [slice(s, s + step) for s in range(0, len(order), step)]

        def schedule(chunk: slice) -> None:
            self.pipe.feed_input(
                "images", self.images[image_order[chunk]], cuda_stream=self.stream()
            )
            if maps is not None:
                self.pipe.feed_input("matrix", maps[order[chunk]])
            self.pipe.schedule_run()
            self.scheduled += 1

        if chunks:
            schedule(chunks[0])
        for i, chunk in enumerate(chunks):
            x, y = self.collect(), self.labels[on_device[chunk]]
            if i + 1 < len(chunks):
                schedule(chunks[i + 1])
            for s in range(0, len(y), self.batch_size):
                yield x[s : s + self.batch_size], y[s : s + self.batch_size]
                if self.owner is not owner:
                    raise RuntimeError("this DALI pipeline has started another epoch since")


def build(images: np.ndarray, labels: np.ndarray, **settings) -> DaliPipeline:
    return DaliPipeline(images, labels, **settings)
