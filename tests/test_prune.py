import json

import pytest
import torch
import torch.nn as nn
from conftest import logits_in_fresh_process, tiny_batches, write_archive

import fastmbv1
from fastmbv1 import prune
from fastmbv1.checkpoint import save_model
from fastmbv1.cli import main
from fastmbv1.errors import UserError
from fastmbv1.info import model_cost
from fastmbv1.models import build_model
from fastmbv1.prune import prune_model


def trained_like(name: str, **kwargs) -> nn.Module:
    """A model whose BN statistics are not the defaults, so pruning them wrongly would show."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", ["mobilenet_v1", "custom_mobilenet"])
def test_half_the_channels_cuts_macs_and_keeps_the_structure(name):
    model = trained_like(name, width=0.5)
    before = prune.layer_channels(model)
    pruned, channels = prune_model(model, name, {"width": 0.5}, ratio=0.5)
    # Half of every layer's channels go, so MACs fall to about a quarter (the stem's three
    # inputs and the ten classes do not shrink: 0.27 and 0.29 here).
    assert channels == [c // 2 for c in before]
    assert model_cost(pruned)["macs"] <= 0.3 * model_cost(model)["macs"]
    assert channels == [pruned.stem[0].out_channels] + [
        b.pointwise[0].out_channels for b in pruned.blocks
    ]
    for block in pruned.blocks:
        dw = block.depthwise[0]
        assert dw.groups == dw.in_channels == dw.out_channels
        if isinstance(getattr(block, "shortcut", None), nn.Identity):  # identity residual add
            assert dw.in_channels == block.pointwise[0].out_channels
    assert pruned(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert prune.layer_channels(model) == before  # a copy was pruned


def test_pruned_model_loads_in_a_fresh_process(tmp_path):
    name, kwargs = "custom_mobilenet", {"width": 0.5}
    pruned, channels = prune_model(trained_like(name, **kwargs), name, kwargs, ratio=0.3)
    path = tmp_path / "pruned.pt"
    save_model(path, pruned, name, {**kwargs, "channels": channels})
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(logits_in_fresh_process(path, x, tmp_path), pruned(x).detach())


def test_target_macs_lands_within_one_step(monkeypatch):
    name, kwargs = "mobilenet_v1", {"width": 0.25}
    model = trained_like(name, **kwargs)
    target = 0.5 * model_cost(model)["macs"]
    pruned, channels = prune_model(model, name, kwargs, target_macs=target)
    assert model_cost(pruned)["macs"] <= target
    # It stopped at the first step of 2.5 % of the channels that met the target: the same
    # ratio in one go gives the same network, and one step less is still above the target.
    step = prune.MAX_RATIO / prune.TARGET_STEPS
    assert step <= 0.025
    widest = prune.layer_channels(model)[-1]
    k = round((1 - channels[-1] / widest) / step)
    assert prune_model(model, name, kwargs, ratio=k * step)[1] == channels
    fewer, _ = prune_model(model, name, kwargs, ratio=(k - 1) * step)
    assert model_cost(fewer)["macs"] > target
    monkeypatch.setattr(prune, "TARGET_STEPS", 3)  # coarse steps reach the limit sooner
    with pytest.raises(UserError, match="out of reach"):
        prune_model(model, name, kwargs, target_macs=1000)


def weaken_half_of_each_layer(model: nn.Module) -> list[set[int]]:
    """Scale a random half of each layer's output channels by 1e-3 wherever they are used
    (conv, BN, the next depthwise conv and BN, the next layer's inputs); returns them."""
    g = torch.Generator().manual_seed(1)
    makers = [model.stem] + [b.pointwise for b in model.blocks]
    weak = []
    with torch.no_grad():
        for i, layer in enumerate(makers):
            w = torch.randperm(layer[0].out_channels, generator=g)[: layer[0].out_channels // 2]
            users = [layer[0].weight, layer[1].weight, layer[1].bias]
            if i < len(model.blocks):
                dw = model.blocks[i].depthwise
                users += [dw[0].weight, dw[1].weight, dw[1].bias]
            for p in users:
                p[w] *= 1e-3
            inputs = model.blocks[i].pointwise[0] if i < len(model.blocks) else model.classifier
            inputs.weight[:, w] *= 1e-3
            weak.append(set(w.tolist()))
    return weak


def output_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN after each layer whose output channels pruning chooses from."""
    return [model.stem[1]] + [b.pointwise[1] for b in model.blocks]


def test_the_lowest_norm_channels_are_the_ones_removed():
    name, kwargs = "mobilenet_v1", {"width": 0.25}
    model = trained_like(name, **kwargs)
    weak = weaken_half_of_each_layer(model)
    pruned, _ = prune_model(model, name, kwargs, ratio=0.5)
    # A channel is known by its BN running mean, one float per channel.
    for layer, (before, after) in enumerate(
        zip(output_bns(model), output_bns(pruned), strict=True)
    ):
        means = before.running_mean.tolist()
        kept = {means.index(v) for v in after.running_mean.tolist()}
        assert kept == set(range(len(means))) - weak[layer], f"layer {layer}"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    name, kwargs = "mobilenet_v1", {"width": 0.25}
    path = tmp_path / "tiny.pt"
    save_model(path, trained_like(name, **kwargs), name, kwargs)
    return path


def test_prune_cli_fine_tunes_and_reports(tmp_path, tiny_checkpoint, capsys):
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    out = tmp_path / "out"
    argv = ["prune", "--checkpoint", str(tiny_checkpoint), "--ratio", "0.5", "--epochs", "1"]
    argv += ["--batch-size", "50", "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "MACs / image" in capsys.readouterr().out
    report = json.loads((out / "prune.json").read_text())
    for when in ("before", "after"):
        assert set(report[when]) == {"test_acc", "params", "macs", "latency_ms"}
    assert report["channels_after"] == [c // 2 for c in report["channels_before"]]
    assert report["after"]["macs"] <= 0.3 * report["before"]["macs"]
    record = torch.load(out / "final.pt", weights_only=True)
    assert record["kwargs"] == {"width": 0.25, "channels": report["channels_after"]}
    # The checkpoint has its depthwise ReLUs; the cpu recipe it was fine-tuned by has none.
    assert json.loads((out / "config.json").read_text())["depthwise_relu"] is True
    assert fastmbv1.load(out / "final.pt")(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("config, preset", [("", "baseline"), ('preset = "fast"\n', "fast")])
def test_training_flags_reach_the_fine_tuning_run(tmp_path, monkeypatch, config, preset):
    """The preset: a flag's, else --config's, else the checkpoint's; flags beat --config."""
    monkeypatch.setattr(prune, "LATENCY_REPEATS", 1)  # the config is what is checked here
    name, kwargs = "mobilenet_v1", {"width": 0.25}
    checkpoint = tmp_path / "trained.pt"
    meta = {"config": {"preset": "baseline"}}
    save_model(checkpoint, trained_like(name, **kwargs), name, kwargs, meta=meta)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(config + "lr = 0.3\nepochs = 1\nwidth = 0.5\n")  # the checkpoint: 0.25
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))
    out = tmp_path / "out"
    argv = ["prune", "--checkpoint", str(checkpoint), "--ratio", "0.5", "--config", str(recipe)]
    argv += ["--device", "cpu", "--lr", "0.05", "--batch-size", "50", "--data", str(data)]
    assert main([*argv, "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["preset"], cfg["device"], cfg["lr"]) == (preset, "cpu", 0.05)
    assert (cfg["epochs"], cfg["batch_size"], cfg["width"]) == (1, 50, 0.25)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ratio", "0"], "--ratio"),
        (["--ratio", "1"], "--ratio"),
        (["--ratio", "1.5"], "--ratio"),
        (["--ratio", "-0.1"], "--ratio"),
        (["--target-macs", "0"], "--target-macs must be > 0"),
        (["--target-macs", "1e12"], "is not below"),
        (["--ratio", "0.5", "--width", "0.5"], "the checkpoint decides"),
        (["--ratio", "0.5", "--no-depthwise-relu"], "--depthwise-relu: the checkpoint decides"),
    ],
)
def test_bad_requests_are_one_line_errors(flags, message, tiny_checkpoint, capsys):
    assert main(["prune", "--checkpoint", str(tiny_checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_ratio_and_target_together_are_refused(tiny_checkpoint, capsys):
    argv = ["prune", "--checkpoint", str(tiny_checkpoint), "--ratio", "0.5", "--target-macs", "1"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_before_after_table():
    before = {"test_acc": 83.2, "params": 215_642, "macs": 3_326_592, "latency_ms": 1.5}
    after = {"test_acc": 80.0, "params": 60_010, "macs": 881_000, "latency_ms": 0.75}
    assert prune.format_table(before, after, pruned_acc=12.5).splitlines() == [
        "                         before    after  after/before",
        "-" * 54,
        "test accuracy %           83.20    80.00         0.962",
        "parameters              215,642   60,010         0.278",
        "MACs / image          3,326,592  881,000         0.265",
        "latency ms (batch 1)      1.500    0.750         0.500",
        "accuracy right after pruning, before fine-tuning: 12.50 %",
    ]
