"""The batches a run trains and evaluates on: CIFAR-10 through the pipeline its config names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastmbv1.config import TrainConfig
from fastmbv1.distributed import World, split_batch
from fastmbv1.errors import UserError
from fastmbv1.evaluate import batch_dtype
from pipelines import Pipeline, build_pipeline
from pipelines.cifar10 import load_cifar10


def pipeline_options(cfg: TrainConfig) -> dict:
    """The options only the torchvision pipeline takes."""
    return {"num_workers": cfg.num_workers} if cfg.pipeline == "torchvision" else {}


def recipe_pipeline(
    cfg: TrainConfig,
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    *,
    train: bool,
    batch_size: int,
    world: World | None = None,
) -> Pipeline:
    """A pipeline as the recipe feeds it: its name, seed, batch dtype, options and shard."""
    world = world or World()
    return build_pipeline(
        cfg.pipeline,
        images,
        labels,
        batch_size=batch_size,
        train=train,
        device=device,
        seed=cfg.seed,
        dtype=batch_dtype(cfg.amp),
        rank=world.rank,
        world_size=world.size,
        alternate_flips=cfg.alt_flip,
        translate=cfg.translate,
        **pipeline_options(cfg),
    )


@dataclass
class RunData:
    """What a run trains and evaluates on, as this rank sees it."""

    train: Pipeline  # this rank's training batches
    test: Pipeline  # this rank's share of the test set
    n_test: int  # test images over all ranks
    images: np.ndarray  # the training images (all ranks'), for a data-dependent init


def run_pipelines(cfg: TrainConfig, device: torch.device, world: World) -> RunData:
    """This rank's training and test pipelines (``train_limit``/``test_limit`` applied)."""
    cifar = load_cifar10(cfg.data)
    train = recipe_pipeline(
        cfg,
        cifar.train_images[: cfg.train_limit],
        cifar.train_labels[: cfg.train_limit],
        device,
        train=True,
        batch_size=split_batch(cfg.batch_size, world),
        world=world,
    )
    if len(train) == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set")
    test = recipe_pipeline(
        cfg,
        cifar.test_images[: cfg.test_limit],
        cifar.test_labels[: cfg.test_limit],
        device,
        train=False,
        batch_size=cfg.eval_batch_size,
        world=world,
    )
    n_test = len(cifar.test_labels[: cfg.test_limit])
    return RunData(train, test, n_test, cifar.train_images[: cfg.train_limit])
