import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import (
    independent_score,
    logits_in_fresh_process,
    tiny_batches,
    with_data_statistics,
    write_archive,
)

import fastmbv1
from fastmbv1.checkpoint import save_model
from fastmbv1.errors import UserError
from fastmbv1.models import build_model


def saved(tmp_path, name="mobilenet_v1", **kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    path = tmp_path / "m.pt"
    save_model(path, model, name, kwargs)
    return model, path


def test_model_file_is_plain_data(tmp_path):
    _, path = saved(tmp_path, width=0.25)
    record = torch.load(path, weights_only=True)
    assert record["model"] == "mobilenet_v1" and record["kwargs"] == {"width": 0.25}
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    json.dumps(meta)  # everything but the tensors is JSON-able
    assert record["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])


def test_load_contract(tmp_path):
    model, path = saved(tmp_path, width=0.25)
    loaded = fastmbv1.load(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    out = loaded(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("name", ["mobilenet_v1", "custom_mobilenet"])
def test_a_network_without_the_depthwise_relu_loads_as_saved(tmp_path, name):
    model, path = saved(tmp_path, name, width=0.25, depthwise_relu=False)
    assert not any(isinstance(m, torch.nn.ReLU) for b in model.blocks for m in b.depthwise)
    x = torch.rand(4, 3, 32, 32)
    with_relu = build_model(name, width=0.25).eval()
    with_relu.load_state_dict(model.state_dict())

    def first_block(m: torch.nn.Module) -> torch.Tensor:  # a fresh network's logits are ~flat
        return m.blocks[0](m.stem(m.normalize(x)))

    assert not torch.allclose(first_block(with_relu), first_block(model))
    loaded = fastmbv1.load(path)
    torch.testing.assert_close(first_block(loaded), first_block(model))
    torch.testing.assert_close(loaded(x), model(x))


def test_load_in_a_fresh_process(tmp_path):
    model, path = saved(tmp_path, width=0.25)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(logits_in_fresh_process(path, x, tmp_path), model(x).detach())


def test_unnormalised_model_records_no_normalisation(tmp_path):
    _, path = saved(tmp_path, width=0.25, normalize=False)
    assert torch.load(path, weights_only=True)["normalization"] is None
    assert fastmbv1.load(path)(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "damage", ["truncated", "garbage", "folder", "missing", "other-model", "unknown-option"]
)
def test_bad_model_files_are_one_line_errors(tmp_path, damage):
    _, path = saved(tmp_path, width=0.25)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage == "missing":
        path.unlink()
    else:  # weights of another width, or an option the network does not take
        record = torch.load(path, weights_only=True)
        record["kwargs"] = {"width": 0.5} if damage == "other-model" else {"bogus": 1}
        torch.save(record, path)
    with pytest.raises(UserError) as e:
        fastmbv1.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_eval_cli_prints_the_saved_models_accuracy_and_reports_bad_files(tmp_path):
    data = write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=200))
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    # BN statistics from data, so that its answers vary: another test set, or images decoded
    # otherwise, would score otherwise.
    model = with_data_statistics(build_model("mobilenet_v1", width=0.25))
    save_model(path, model, "mobilenet_v1", {"width": 0.25})
    eval_cli = [sys.executable, "-m", "fastmbv1", "eval", "--checkpoint", str(path)]
    r = subprocess.run(
        [*eval_cli, "--data", str(data)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    printed = re.fullmatch(r"test accuracy: ([0-9.]+) %", r.stdout.strip())
    assert printed and float(printed[1]) == round(independent_score(path, data), 2)
    path.write_bytes(b"junk")
    r = subprocess.run(eval_cli, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_help_lists_commands():
    r = subprocess.run(
        [sys.executable, "-m", "fastmbv1", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for command in ("train", "eval"):
        assert command in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "fastmbv1", "eval", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--checkpoint" in r.stdout
