"""torch.compile through the real trainer, on the CPU, so the compiled path runs on every change.

Inductor works here (gcc is installed). The tests that only count graphs use a backend that
records each graph and runs it as it is, which compiles in moments.
"""

import json

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_batches, tiny_classifier, tiny_config, write_archive

import fastmbv1
from fastmbv1 import step
from fastmbv1 import train as train_module
from fastmbv1.models import MODELS
from fastmbv1.train import train


@pytest.fixture
def data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


def config(tmp_path, data, name="run", **kw):
    return tiny_config(tmp_path, data, name, **{"epochs": 1, "compile": True, **kw})


class CountingBackend:
    """A dynamo backend that keeps every graph it is given and runs it uncompiled."""

    def __init__(self) -> None:
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def counting(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(step, "COMPILE_BACKEND", backend)
    return backend


@pytest.mark.slow
def test_inductor_trains_bf16_channels_last(tmp_path, data):
    result = train(config(tmp_path, data, amp="bf16", channels_last=True, epochs=2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compile_s"] > 0 and "compile" not in summary["why"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["compile"] is True
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fastmbv1.load(tmp_path / "run" / "final.pt")(x), result.model(x))


def test_a_fifth_width_in_one_process_is_still_compiled(tmp_path, data, counting):
    # Each width adds graphs to the same forward code; without a fresh compile state per run
    # the fifth width would hit dynamo's recompile limit and silently run eager.
    # The start's compile probe adds a tiny graph of its own every run: count the model's.
    for i, width in enumerate((0.25, 0.5, 0.75, 1.0, 0.125)):
        before = len(counting.graphs)
        train(config(tmp_path, data, f"w{i}", width=width))
        sizes = [len(g.graph.nodes) for g in counting.graphs[before:]]
        assert max(sizes, default=0) > 50, f"width {width} was not compiled: graphs {sizes}"


def symbolic_inputs(gm) -> list[str]:
    """The graph's inputs that are sizes rather than tensors of fixed shape: what dynamo adds
    when it compiles a dimension as dynamic."""
    found = []
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        shape = getattr(value, "shape", ())
        if isinstance(value, torch.SymInt) or any(isinstance(d, torch.SymInt) for d in shape):
            found.append(node.name)
    return found


def test_the_eval_graph_compiles_after_the_first_step_with_a_static_batch(
    tmp_path, data, counting, monkeypatch
):
    # 40 test images in batches of 16 (the training batch is 32): the last batch of 8 is
    # padded to 16, so the eval graph that the warm-up compiled serves every evaluation as
    # it is, and its batch is a number, not a symbol that dynamo made dynamic.
    real, seen = train_module.evaluate_run, []

    def watched(*args):
        before = len(counting.graphs)
        acc = real(*args)
        seen.append(len(counting.graphs) - before)
        return acc

    monkeypatch.setattr(train_module, "evaluate_run", watched)
    summary = train(config(tmp_path, data, epochs=2, eval_batch_size=16)).summary
    assert seen == [0, 0]  # no evaluation compiled anything: the warm-up did, and counted it
    assert summary["compile_s"] > 0
    model_graphs = [g for g in counting.graphs if len(g.graph.nodes) > 50]
    assert len(model_graphs) == 2  # the training step's and the evaluation's, nothing more
    assert [symbolic_inputs(g) for g in model_graphs] == [[], []]


def test_a_backend_that_cannot_compile_falls_back_to_eager(tmp_path, data, monkeypatch, capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    monkeypatch.setattr(step, "COMPILE_BACKEND", broken)
    train(config(tmp_path, data))
    err = capsys.readouterr().err
    assert "compile off: torch.compile failed" in err and "no C compiler here" in err
    for name in ("config.json", "summary.json"):
        saved = json.loads((tmp_path / "run" / name).read_text())
        assert "no C compiler here" in saved["why"]["compile"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["compile"] is False


@pytest.mark.slow
def test_two_gloo_ranks_train_compiled_in_step(tmp_path, data):
    from test_distributed import free_port, rank_main

    out = tmp_path / "run"
    fields = {"epochs": 1, "compile": True}
    args = (2, free_port(), str(data), str(out), str(tmp_path / "cache"), fields)
    mp.spawn(rank_main, args=args, nprocs=2, join=True)
    w0, w1 = (torch.load(f"{out}.rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert json.loads((out / "summary.json").read_text())["compile_s"] > 0


def test_six_views_compile_to_the_eager_answer():
    # The fast recipe's saved model averages six views, and a GPU run evaluates it compiled:
    # real Inductor must give the eager model's answer (the views live in Classifier.forward).
    torch.manual_seed(0)
    model = tiny_classifier(tta=True, tta_translate=True).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x))


def test_summary_says_cold_then_warm_and_artifacts_warm_a_fresh_cache(tmp_path, data, monkeypatch):
    # Real Inductor on a tiny model: a fresh cache folder misses and records its
    # cold seconds; the same folder then hits and records warm seconds beside them; and the
    # artifacts the first run wrote make a second, empty folder hit as well.
    monkeypatch.setitem(MODELS, "tiny", tiny_classifier)
    # Compile in this process: a pool of compile workers would first import torch each.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    artifacts = tmp_path / "compiled.bin"

    def run(name: str, cache: str) -> dict:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / cache))
        cfg = config(
            tmp_path, data, name, model="tiny", tta=False, compile_artifacts=str(artifacts)
        )
        train(cfg)
        return json.loads((tmp_path / name / "summary.json").read_text())["compile"]

    cold = run("cold", "cache")
    assert cold["cache"] == "miss" and cold["fxgraph_misses"] > 0 and cold["fxgraph_hits"] == 0
    assert cold["cold_s"] == cold["seconds"] > 0 and "warm_s" not in cold
    assert artifacts.stat().st_size == cold["artifacts_saved_bytes"] > 0
    warm = run("warm", "cache")
    assert warm["cache"] == "hit" and warm["fxgraph_misses"] == 0
    assert warm["cold_s"] == cold["cold_s"] and warm["warm_s"] == warm["seconds"] > 0
    shipped = run("shipped", "fresh-cache")
    assert shipped["artifacts_loaded"] > 0 and shipped["cache"] == "hit"
