import pytest
import torch
import torch.nn as nn
from conftest import tiny_classifier

import fastmbv1
from fastmbv1.checkpoint import save_model
from fastmbv1.errors import UserError
from fastmbv1.models import MODELS, build_model, takes

PARAMS = {"mobilenet_v1": 3_217_226, "custom_mobilenet": 1_001_642}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_matches_the_original(name):
    assert n_params(build_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_half_width_is_smaller(name):
    assert n_params(build_model(name, width=0.5)) < PARAMS[name] / 3


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_depthwise_convs_are_grouped_per_channel(name):
    convs = [m for m in build_model(name).modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.kernel_size == (3, 3) and c.in_channels > 3]
    assert len(depthwise) == {"mobilenet_v1": 13, "custom_mobilenet": 22}[name]
    for conv in depthwise:
        assert conv.groups == conv.in_channels == conv.out_channels


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_forward_shape(name):
    model = build_model(name, width=0.25).eval()
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_custom_mobilenet_residual_layout():
    blocks = build_model("custom_mobilenet").blocks
    projecting = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    # Channel changes at blocks 0 (16->32), 3, 7, 16 and 20 (stride 2 at the last four).
    assert projecting == [0, 3, 7, 16, 20]


def prune(channels: list[int], name: str) -> list[int]:
    """Narrower widths that keep every identity-shortcut block's in == out."""
    base = build_model(name).blocks
    out = [max(1, c - 3) for c in channels]
    if name == "custom_mobilenet":  # a stage shares one width across its identity blocks
        for i, block in enumerate(base):
            if isinstance(block.shortcut, nn.Identity):
                out[i + 1] = out[i]
    return out


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_channels_override_round_trips_through_a_model_file(name, tmp_path):
    full = build_model(name, width=0.25)
    widths = [full.stem[0].out_channels] + [b.pointwise[0].out_channels for b in full.blocks]
    kwargs = {"channels": prune(widths, name)}
    model = build_model(name, **kwargs).eval()
    assert n_params(model) < n_params(full)
    path = tmp_path / "pruned.pt"
    save_model(path, model, name, kwargs)
    loaded = fastmbv1.load(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_custom_mobilenet_rejects_identity_blocks_of_unequal_widths():
    channels = [16] + [32] * 3 + [64] * 4 + [128] * 9 + [256] * 4 + [512] * 2
    channels[2] = 31  # block 1 is an identity block: 32 -> 31 cannot be added to its input
    with pytest.raises(ValueError, match="identity shortcut"):
        build_model("custom_mobilenet", channels=channels)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet9000")
    assert {"mobilenet_v1", "custom_mobilenet"} <= set(MODELS)


def test_an_option_a_network_does_not_take_is_a_user_error(monkeypatch):
    # Checked against the class's own signature, as registered: a TypeError from deep in its
    # constructor would be a traceback.
    with pytest.raises(UserError, match="'mobilenet_v1' cannot be built .*'bogus'"):
        build_model("mobilenet_v1", width=0.25, bogus=1)
    monkeypatch.setitem(MODELS, "plain", lambda width=1.0: nn.Linear(3, 10))
    with pytest.raises(UserError, match="'plain' cannot be built .*depthwise_relu"):
        build_model("plain", width=0.5, depthwise_relu=False)
    assert isinstance(build_model("plain", width=0.5), nn.Linear)


def test_the_recipe_drops_depthwise_relus_only_where_a_network_has_them(monkeypatch):
    from fastmbv1.plan import make_config
    from fastmbv1.step import build_run

    monkeypatch.setitem(MODELS, "flat", tiny_classifier)
    monkeypatch.setitem(MODELS, "open", lambda **kwargs: tiny_classifier())
    assert takes("mobilenet_v1", "depthwise_relu") and takes("open", "depthwise_relu")
    assert not takes("flat", "depthwise_relu")
    # The cpu recipe has no depthwise ReLU, and builds the flat network all the same.
    cfg = make_config({"preset": "cpu", "model": "flat", "width": 0.25})
    assert not cfg.depthwise_relu
    assert "depthwise_relu" not in build_run(cfg, torch.device("cpu")).kwargs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_normalisation_keeps_the_batchs_dtype(dtype):
    # A half-size batch must stay half-size into the stem (autocast casts there anyway), and
    # be what that cast would have made of the fp32 result: the values are unchanged.
    norm = build_model("mobilenet_v1", width=0.25).normalize
    x = torch.rand(4, 3, 32, 32).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    expected = ((x.float() - norm.mean) / norm.std).to(dtype)
    assert torch.equal(out, expected)
