"""Two gloo ranks on the CPU: disjoint shards, identical weights, exact gathered accuracy."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_batches, write_archive

import fastmbv1
from fastmbv1.evaluate import evaluate
from pipelines import available, build_pipeline
from pipelines.cifar10 import load_cifar10

CPU_PIPELINES = [name for name, why in available("cpu").items() if why is None]


@pytest.mark.parametrize("name", CPU_PIPELINES)
def test_shards_are_disjoint_equal_and_cover_the_epoch(name):
    n, world = 100, 2
    images = np.zeros((n, 32, 32, 3), np.uint8)
    labels = np.arange(n)
    seen = []
    for rank in range(world):
        pipe = build_pipeline(
            name,
            images,
            labels,
            batch_size=10,
            train=True,
            device="cpu",
            seed=3,
            rank=rank,
            world_size=world,
        )
        seen.append(torch.cat([y for _, y in pipe]).tolist())
    assert len(seen[0]) == len(seen[1]) == n // world
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, data, out, cache, fields=None):
    """One torchrun-like rank: train a tiny run (``fields`` override it); save its weights, and
    what it was given to train and evaluate on."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        FASTMBV1_CACHE=cache,
    )
    torch.set_num_threads(1)
    import fastmbv1.plan
    import fastmbv1.train
    from fastmbv1 import distributed
    from fastmbv1.plan import make_config
    from fastmbv1.train import train

    runs, counts = [], []
    real_pipelines, real_evaluate = fastmbv1.plan.run_pipelines, fastmbv1.train.evaluate

    def run_pipelines(*args):
        runs.append(real_pipelines(*args))
        return runs[-1]

    def evaluate(*args):
        counts.append(real_evaluate(*args))
        return counts[-1]

    fastmbv1.plan.run_pipelines, fastmbv1.train.evaluate = run_pipelines, evaluate
    cfg = make_config(
        {
            "preset": "cpu",
            "data": data,
            "out": out,
            "width": 0.25,
            "epochs": 2,
            "batch_size": 32,
            "pipeline": "torch",
            "eval_batch_size": 50,
            **(fields or {}),
        }
    )
    result = train(cfg)
    torch.save(result.model.state_dict(), f"{out}.rank{rank}.pt")
    [run_data] = runs
    train_pipe, test_pipe = run_data.train, run_data.test
    seen = {
        "train": [train_pipe.indices(e).tolist() for e in range(cfg.epochs)],
        "test": test_pipe.indices(0).tolist(),
        "final_eval": counts[-1],
        "summed": distributed.init(torch.device("cpu"), 120).sum(
            [rank + 1, 10], torch.device("cpu")
        ),
    }
    (Path(f"{out}.rank{rank}.json")).write_text(json.dumps(seen))
    distributed.shutdown()


@pytest.mark.timeout(300)  # a rank left waiting in a collective fails here, not hangs
def test_two_ranks_train_in_step(tmp_path):
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    out = tmp_path / "run"
    # 39 test images: shards of 20 and 19, so one rank's accuracy alone cannot pass for
    # the gathered one unless both are 0 % or 100 %.
    mp.spawn(
        rank_main,
        args=(2, free_port(), str(data), str(out), str(tmp_path / "cache"), {"test_limit": 39}),
        nprocs=2,
        join=True,
    )
    w0, w1 = (torch.load(f"{out}.rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # Only rank 0 wrote: one line per epoch, the usual files and nothing else.
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "final.pt",
        "metrics.jsonl",
        "summary.json",
    ]
    # Each rank trains on its own half of the 200 images: 6 whole batches of 16 of its 100
    # an epoch (the whole set on every rank would be 12); the halves are disjoint, and each
    # epoch draws them anew.
    assert [r["step"] for r in records] == [6, 12]
    seen = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(2):
        halves = [set(s["train"][epoch]) for s in seen]
        assert len(halves[0]) == len(halves[1]) == 96 and not halves[0] & halves[1]
    assert seen[0]["train"][0] != seen[0]["train"][1]
    # The test set too: disjoint shards of 20 and 19 that cover it, counts summed over ranks.
    assert [len(s["test"]) for s in seen] == [20, 19]
    assert sorted(seen[0]["test"] + seen[1]["test"]) == list(range(39))
    assert [s["summed"] for s in seen] == [[3, 20], [3, 20]]
    (c0, n0), (c1, n1) = (s["final_eval"] for s in seen)
    assert (n0, n1) == (20, 19)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == pytest.approx(100.0 * (c0 + c1) / 39)
    assert 0 < c0 + c1 < 39  # else one rank's share alone would give the same figure
    # And that is what a single process scores with the saved model.
    model = fastmbv1.load(out / "final.pt")
    cifar = load_cifar10(data, cache_dir=tmp_path / "cache")
    test = build_pipeline(
        "torch",
        cifar.test_images[:39],
        cifar.test_labels[:39],
        batch_size=50,
        train=False,
        device="cpu",
        seed=0,
    )
    correct, total = evaluate(model, test, torch.device("cpu"))
    assert total == 39
    assert summary["final_test_acc"] == pytest.approx(100.0 * correct / total)


def test_one_rank_forced_into_ddp_trains_through_the_ddp_wrapper(tmp_path, monkeypatch):
    # The GPU check's `torchrun --nproc-per-node 1` run with FASTMBV1_DDP=1: a process group
    # of one, and the step really runs through DistributedDataParallel, as the summary says.
    from torch.nn.parallel import DistributedDataParallel

    from fastmbv1 import distributed
    from fastmbv1 import train as train_module
    from fastmbv1.plan import make_config

    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", FASTMBV1_DDP="1")  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    built = []
    real = train_module.build_run
    monkeypatch.setattr(
        train_module, "build_run", lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    )
    fields = dict(preset="cpu", data=str(data), out=str(tmp_path / "run"), width=0.25, epochs=1,
                  batch_size=32, pipeline="torch", eval_batch_size=50)  # fmt: skip
    try:
        summary = train_module.train(make_config(fields)).summary
        assert torch.distributed.is_initialized()
    finally:
        distributed.shutdown()
    assert isinstance(built[0].model_for_step, DistributedDataParallel)
    assert summary["ddp"] is True and summary["ranks"] == 1


def test_the_gpu_checks_ddp1_run_is_forced_through_ddp(tmp_path, monkeypatch):
    # The check's one-rank DDP run is the run above: torchrun with one rank, FASTMBV1_DDP=1,
    # and otherwise the same flags as the eager run it is compared with.
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("check", ROOT / "bench" / "gpu" / "check.py")
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check", check)  # its dataclasses look themselves up
    spec.loader.exec_module(check)
    phases = {p.name: p for p in check.plan("cuda", "d.tar.gz", False, tmp_path, True, tmp_path)}
    ddp, eager = phases["train-eager-ddp1"], phases["train-eager"]
    assert ddp.env == {"FASTMBV1_DDP": "1"} and eager.env == {}
    assert ddp.argv[2:7] == ["torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    assert ddp.argv[7:] == [a.replace("train-eager", "train-eager-ddp1") for a in eager.argv[2:]]
    # Training runs first, each with its budget reserved, then the benches.
    assert [p.train for p in phases.values()] == [True] * 4 + [False] * 5
