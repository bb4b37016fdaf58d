import pytest
import torch
from conftest import with_data_statistics

from fastmbv1.checkpoint import save_model
from fastmbv1.cli import main
from fastmbv1.models import build_model


# The shipped model (mobilenet_v1, flip TTA on by default), with the 6-view TTA, and the
# original custom one; with test-time views inside the model (the mirror; the mirror and two
# shifts), the exported graph must average them too.
@pytest.fixture(
    scope="module",
    params=[
        ("mobilenet_v1", {"tta": True}),
        ("mobilenet_v1", {"tta": True, "tta_translate": True}),
        ("custom_mobilenet", {"tta": False}),
        ("custom_mobilenet", {"tta": True}),
    ],
    ids=["mobilenet_v1-tta", "mobilenet_v1-tta-6-views", "custom-plain", "custom-tta"],
)
def saved(tmp_path_factory, request) -> tuple:
    """A model file whose BN statistics come from data, so the logits have a sane scale."""
    name, views = request.param
    kwargs = {"width": 0.25, **views}
    model = with_data_statistics(build_model(name, **kwargs))
    path = tmp_path_factory.mktemp("export") / "final.pt"
    save_model(path, model, name, kwargs)
    x = torch.rand(5, 3, 32, 32)  # not the batch size of the export example
    with torch.no_grad():
        return path, x, model(x).numpy()


def test_onnx_matches_pytorch(saved, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path, x, expected = saved
    assert main(["export", "--checkpoint", str(path), "--format", "onnx"]) == 0
    out = path.with_suffix(".onnx")
    assert str(out) in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    assert logits.shape == (5, 10)
    assert abs(logits - expected).max() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch(saved, tmp_path):
    path, x, expected = saved
    out = tmp_path / "model.ts.pt"
    assert main(["export", "--checkpoint", str(path), "--format", "torchscript",
                 "--out", str(out)]) == 0  # fmt: skip
    with torch.no_grad():
        logits = torch.jit.load(str(out))(x).numpy()
    assert abs(logits - expected).max() < 1e-4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "missing.pt", "--format", "onnx"], "does not exist"),
        (["--format", "torchscript", "--out", "no/such/dir/m.pt"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(saved, tmp_path, capsys, argv, message):
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(saved[0]), *argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
