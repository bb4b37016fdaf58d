"""What a plain `fastmbv1 train` does on the machine it meets: the preset that suits the
device, a run sized to its budget, evaluations that cost little, and a reported accuracy
that is the saved model's own."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import (
    independent_score,
    tiny_batches,
    tiny_config,
    with_data_statistics,
    write_archive,
)

import fastmbv1
from fastmbv1 import config, plan
from fastmbv1.clock import BudgetClock
from fastmbv1.config import TrainConfig, narrowest
from fastmbv1.distributed import World
from fastmbv1.errors import UserError
from fastmbv1.evaluate import evaluate_checkpoint
from fastmbv1.plan import make_config, resolve, resume_config
from fastmbv1.train import train
from pipelines import build_pipeline


@pytest.fixture
def data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


@pytest.mark.parametrize(
    "cuda, fields, preset",
    [
        (True, {}, "fast"),
        (False, {}, "cpu"),
        (True, {"device": "cpu"}, "cpu"),  # a CPU run on a GPU machine (or a gloo rank)
        (False, {"device": "cuda"}, "fast"),  # then refused at start: no GPU
        (True, {"preset": "baseline"}, "baseline"),  # an explicit preset always wins
        (False, {"preset": "auto"}, "cpu"),
    ],
)
def test_auto_preset_follows_the_device(monkeypatch, cuda, fields, preset):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert make_config(fields).preset == preset


def test_cuda_graphs_default_to_one_process_without_fp16_and_are_refused_elsewhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert plan.graphs_problem(cuda, "bf16", World()) is None
    assert plan.graphs_problem(cuda, "off", World()) is None
    assert "fp16" in plan.graphs_problem(cuda, "fp16", World())
    assert "DDP" in plan.graphs_problem(cuda, "bf16", World(size=2))
    assert "DDP" in plan.graphs_problem(cuda, "bf16", World(forced=True))
    assert "Muon" in plan.graphs_problem(cuda, "bf16", World(), muon=0.5)
    cfg, why = resolve(make_config({"device": "cpu"}), cpu)
    assert cfg.cuda_graphs is False and why["cuda_graphs"].startswith("off: CUDA graphs need")
    with pytest.raises(UserError, match="--cuda-graphs: CUDA graphs need a CUDA GPU"):
        resolve(make_config({"device": "cpu", "cuda_graphs": True}), cpu)


def test_the_evaluation_batch_follows_the_device_unless_given(tmp_path, data, monkeypatch):
    cpu = torch.device("cpu")
    # About 128 images a forward on the CPU, whatever the model's views of a test image.
    assert [config.default_eval_batch(False, views) for views in (1, 2, 6)] == [128, 64, 21]
    assert config.default_eval_batch(True, 6) == 1000
    # Every preset, the original project's too: the batch changes the speed, not the score.
    views = {"fast": 6, "cpu": 6, "baseline": 1, "custom": 1}
    for preset in config.PRESETS:
        cfg, why = resolve(make_config({"preset": preset, "device": "cpu"}), cpu)
        batch = 128 // views[preset]
        assert cfg.eval_batch_size == batch and why["eval_batch_size"].startswith(f"{batch}: ")
    cfg, why = resolve(make_config({"device": "cpu", "eval_batch_size": 500}), cpu)
    assert cfg.eval_batch_size == 500 and "eval_batch_size" not in why
    # `fastmbv1 evaluate` takes its batch from the device and the saved model's views.
    asked = []
    monkeypatch.setattr(
        "fastmbv1.evaluate.build_pipeline",
        lambda *a, **kw: asked.append(kw["batch_size"]) or build_pipeline(*a, **kw),
    )
    for views in (2, 6):
        cfg = tiny_config(tmp_path, data, str(views), epochs=1, tta_translate=views == 6)
        train(cfg)
        evaluate_checkpoint(str(tmp_path / str(views) / "final.pt"), str(data), "cpu")
    assert asked == [64, 21]


def test_auto_never_reaches_a_saved_config_and_resume_keeps_the_resolved_one(
    tmp_path, data, monkeypatch
):
    cfg = tiny_config(tmp_path, data, preset="auto", epochs=1)
    assert cfg.preset == "cpu"
    train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["preset"] == "cpu"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preset"] == "cpu"
    # The same run resumed on a machine where auto would now mean the GPU recipe.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resume_config(tmp_path / "run", {}).preset == "cpu"
    # Flags that leave a choice to the run (a tune's best.toml holds model = "auto") resume it.
    resumed = resume_config(run, {"preset": "auto", "model": "auto"})
    assert (resumed.preset, resumed.model) == ("cpu", "mobilenet_v1")


def test_a_resumed_run_keeps_the_defaults_of_fields_added_after_it_started(tmp_path):
    # A config.json from before --translate and --depthwise-relu: that run shifted images by up
    # to 4 pixels, whatever the cpu preset says now, and its checkpoint has the ReLUs.
    run = tmp_path / "old"
    run.mkdir()
    cfg = make_config({"preset": "cpu", "width": 0.25, "epochs": 2, "batch_size": 64})
    stored = {k: v for k, v in vars(cfg).items() if k not in ("translate", "depthwise_relu")}
    (run / "config.json").write_text(json.dumps(stored))
    resumed = resume_config(run, {})
    assert (resumed.translate, resumed.depthwise_relu) == (4, True)
    assert (resumed.preset, resumed.batch_size, resumed.dirac) == ("cpu", 64, True)


def test_epochs_fit_the_budget_at_the_measured_speed(tmp_path, data, monkeypatch, capsys):
    speeds = iter([400.0, 100.0])  # images/s: a fast machine, then a four times slower one
    monkeypatch.setattr(
        "fastmbv1.plan.measure_step",
        lambda *a, **k: {"images_per_s": next(speeds)},
    )
    epochs = []
    for name in ("fast", "slow"):
        # 200 images an epoch: 0.5 s at 400 images/s, 2 s at 100.
        cfg = tiny_config(tmp_path, data, name, epochs=None, budget=30.0, eval_every=None)
        train(cfg)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        epochs.append(saved["epochs"])
        assert "measured" in saved["why"]["epochs"] and f"{epochs[-1]}:" in saved["why"]["epochs"]
    assert "images/s" in capsys.readouterr().err  # the choice is printed with its reason
    # Per epoch 200 images plus a few percent; the budget less startup, final eval and save;
    # then half as many again.
    assert 60 <= epochs[0] <= 90 and 15 <= epochs[1] <= 23
    assert epochs[0] == pytest.approx(4 * epochs[1], rel=0.2)


def test_fit_counts_what_is_left_of_the_budget(monkeypatch):
    monkeypatch.setattr("fastmbv1.plan.measure_step", lambda *a, **k: {"images_per_s": 1000.0})
    from fastmbv1.distributed import World

    cfg = make_config({"preset": "cpu", "width": 0.25, "budget": 60.0, "tta": False})
    now = plan.time.perf_counter()
    # 50 steps of 128 images: 6.4 s an epoch (6.72 s with the overhead). 8.3 and 3.9 epochs
    # fit; half as many again are planned (the next test says why).
    full, why = plan.fit_epochs(cfg, torch.device("cpu"), World(), now, 50, 10_000)
    late, _ = plan.fit_epochs(cfg, torch.device("cpu"), World(), now - 30.0, 50, 10_000)
    assert full.epochs == 13 and late.epochs == 6
    assert "fit about 8.3 epochs" in why["epochs"] and "50% more planned" in why["epochs"]
    assert "1,000 images/s" in why["epochs"] and "width" not in why  # --width was given
    assert full.width == late.width == 0.25


def test_a_budget_too_short_for_the_final_evaluation_is_refused_before_the_run(monkeypatch):
    # A fresh clone's first run beside another job timed 110 images/s: six views of 10,000
    # test images then take about 160 s, and a 60 s run trained 2 steps and ended at 128 s.
    monkeypatch.setattr("fastmbv1.plan.measure_step", lambda *a, **k: {"images_per_s": 110.0})
    cfg = make_config({"preset": "cpu", "width": 0.25, "budget": 60.0})
    with pytest.raises(
        UserError, match="--budget 60 is too short .* about 165 s at the 110 .*--no-tta-translate"
    ):
        plan.fit_epochs(cfg, torch.device("cpu"), World(), plan.time.perf_counter(), 50, 10_000)
    # With fewer test images the evaluation fits, and the run goes ahead.
    fitted, _ = plan.fit_epochs(
        cfg, torch.device("cpu"), World(), plan.time.perf_counter(), 50, 1_000
    )
    assert fitted.epochs >= 1


@pytest.mark.parametrize("faster", [1.0, 1.4])
def test_a_machine_faster_than_timed_still_fills_its_budget(monkeypatch, faster):
    # Timed at 1,000 images/s, the machine then steps 1.4 times as fast (as a shared one did
    # on 2026-12-07). Planned for only the epochs that fitted, the run would finish its
    # steps with a quarter of the budget unused; it must still end near the budget, annealed.
    monkeypatch.setattr("fastmbv1.plan.measure_step", lambda *a, **k: {"images_per_s": 1000.0})
    cfg = make_config({"preset": "cpu", "width": 0.25, "budget": 60.0, "tta": False})
    now = [0.0]
    monkeypatch.setattr(plan.time, "perf_counter", lambda: now[0])
    fitted, _ = plan.fit_epochs(cfg, torch.device("cpu"), World(), 0.0, 50, 10_000)
    total = fitted.epochs * 50
    eval_steps = plan.eval_cost(fitted, 10_000) / fitted.batch_size
    clock = BudgetClock(60.0, total, eval_steps=eval_steps, start=0.0, now=lambda: now[0])
    progress = []
    while (p := clock.progress(len(progress))) < 1.0 and len(progress) < total:
        progress.append(p)
        now[0] += fitted.batch_size / 1000.0 / faster
    assert len(progress) < total  # stopped by the clock, not by running out of steps
    assert now[0] >= 0.97 * clock.available() and progress[-1] > 0.97


def test_the_budget_picks_the_biggest_network_that_fits_enough_epochs(monkeypatch):
    from fastmbv1.distributed import World

    timed = []
    # Half width at 40 % of quarter width's speed, CustomMobileNet at 40 % of half width's.
    speeds = {("custom_mobilenet", 1.0): 160.0, ("mobilenet_v1", 0.5): 400.0}

    clock = [0.0]

    def measure_step(cfg, device, **kw):
        timed.append((cfg.model, cfg.width))
        clock[0] += 5.0  # each timing spends 5 s of the budget
        return {"images_per_s": speeds.get((cfg.model, cfg.width), 1000.0)}

    monkeypatch.setattr("fastmbv1.plan.measure_step", measure_step)
    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock[0])
    cfg = make_config({"preset": "cpu", "tta": False})
    assert cfg.model == "auto" and cfg.width is None and cfg.epochs is None
    custom, half, quarter = ("custom_mobilenet", 1.0), ("mobilenet_v1", 0.5), ("mobilenet_v1", 0.25)

    said = {}

    def fitted(budget: float, **fields) -> TrainConfig:
        timed.clear()
        said.clear()
        clock[0] = 0.0
        out, why = plan.fit_epochs(
            replace(cfg, budget=budget, **fields), torch.device("cpu"), World(), 0.0, 50, 10_000
        )
        assert f"{out.model} at width {out.width:g}" in why["epochs"]
        assert why.get("width", f"{out.width:g}:").startswith(f"{out.width:g}:")
        assert ("width" in why) == ("width" not in fields)
        assert ("model" in why) == (cfg.model == "auto" and "model" not in fields)
        assert why.get("model", out.model).startswith(out.model)
        said.update(why)
        return out

    # An epoch takes 42 s of CustomMobileNet, 16.8 s at half width, 6.72 s at quarter width.
    # The smallest is timed first, then the others in order while they could fit.
    big = fitted(1200.0)
    assert ((big.model, big.width), timed, big.epochs) == (custom, [quarter, custom], 42)
    mid = fitted(600.0)  # 14 of custom: too few
    assert ((mid.model, mid.width), timed) == (half, [quarter, custom, half])
    # 14 epochs at quarter width: CustomMobileNet cannot fit 24 even at that speed, untimed;
    # the epochs of quarter width then count the time spent timing half width too.
    small = fitted(100.0)
    assert ((small.model, small.width), timed, small.epochs) == (quarter, [quarter, half], 20)
    assert "the 90 s left" in said["epochs"]
    assert (
        "at most 13.5 epochs of custom_mobilenet at width 1 (needs 24; not timed)" in said["model"]
    )
    tiny = fitted(40.0)  # 4.5 epochs fit, 7 planned
    assert ((tiny.model, tiny.width), timed, tiny.epochs) == (quarter, [quarter], 7)
    # A network the user names keeps its name; the budget then weighs only its widths.
    named = fitted(1200.0, model="mobilenet_v1")
    assert ((named.model, named.width), timed) == (half, [quarter, half])
    # A width alone means MobileNetV1 at that width.
    wide = fitted(1200.0, width=1.0)
    assert (wide.model, wide.width, timed) == ("mobilenet_v1", 1.0, [("mobilenet_v1", 1.0)])
    # Given epochs leave nothing to weigh the size against: the smallest, and why.
    given, why = resolve(make_config({"preset": "cpu", "epochs": 5}), torch.device("cpu"))
    assert (given.model, given.width) == ("mobilenet_v1", 0.25)
    assert "--epochs" in why["width"] and "--epochs" in why["model"]
    # The bench times a preset as a run would start it, at the smallest automatic size.
    assert (narrowest(cfg).model, narrowest(cfg).width) == ("mobilenet_v1", 0.25)
    assert narrowest(replace(cfg, width=1.0)).width == 1.0


def test_evaluations_stay_within_two_percent_of_the_time_and_the_last_is_always_made():
    from fastmbv1.distributed import World
    from fastmbv1.state import Totals
    from fastmbv1.train import Epoch, Signals, end_of_epoch

    now = [0.0]
    clock = BudgetClock(10_000.0, 10**6, eval_steps=0, now=lambda: now[0])
    clock.measured_eval(2.0)  # an evaluation takes 2 s
    cfg = make_config({"preset": "cpu", "eval_every": None, "epochs": 100})
    totals = Totals(epochs_done=1)
    epoch = Epoch(1, 128, torch.zeros(1), 0, 0.1, 0.0, 1.0, 0.0, 0, None)

    def due(at: float) -> bool:
        now[0] = at
        stop, evaluate = end_of_epoch(epoch, cfg, totals, clock, World(), Signals())
        assert stop is None
        return evaluate

    assert not due(50.0)  # 2 s would be 4 % of 50 s
    assert due(100.0)  # and 2 % of 100 s
    totals.eval_s = 2.0
    assert not due(150.0) and due(200.0)  # 4 s of evaluation in 200 s
    totals.epochs_done = 100  # the last epoch is evaluated whatever it costs
    now[0] = 201.0
    assert end_of_epoch(epoch, cfg, totals, clock, World(), Signals()) == ("epochs", True)


def test_the_budget_keeps_back_the_final_evaluation_by_its_views(tmp_path, data, monkeypatch):
    kept = {}

    class Clock(BudgetClock):
        def __init__(self, *args, eval_steps, **kwargs):
            kept[views] = eval_steps
            super().__init__(*args, eval_steps=eval_steps, **kwargs)

    monkeypatch.setattr("fastmbv1.train.BudgetClock", Clock)
    for views in (1, 2, 6):
        cfg = tiny_config(
            tmp_path, data, str(views), epochs=1, tta=views > 1, tta_translate=views == 6
        )
        assert cfg.eval_views == views
        train(cfg)
    # Until an evaluation is timed, each view of a test image is a share of a training image.
    per_view = 40 * plan.EVAL_COST / 32  # 40 test images, batches of 32
    assert kept == pytest.approx({1: per_view, 2: 2 * per_view, 6: 6 * per_view})


@pytest.mark.parametrize("views", [2, 6], ids=["mirror", "mirror-and-shifts"])
def test_the_reported_accuracy_is_the_saved_models(tmp_path, data, views):
    cfg = tiny_config(
        tmp_path, data, epochs=3, ema=0.9, tta=True, tta_translate=views == 6, checkpoint_every=1
    )
    summary = train(cfg).summary
    final = tmp_path / "run" / "final.pt"
    assert fastmbv1.load(final).tta and fastmbv1.load(final).tta_translate == (views == 6)
    # Scored apart from the trainer (pickle and fastmbv1.load, none of its data or evaluation
    # code; the real-data run in test_train.py is where a difference would show), and as
    # `fastmbv1 eval` scores it.
    assert summary["final_test_acc"] == independent_score(final, data)
    assert evaluate_checkpoint(str(final), str(data), "cpu") == summary["final_test_acc"]
    # The average, not the last weights, is what was saved: the checkpoint holds both.
    ckpt = torch.load(tmp_path / "run" / "checkpoint-0003.pt", weights_only=True)
    raw, ema = ckpt["model_record"]["state_dict"], ckpt["ema"]["state_dict"]
    saved = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["state_dict"]
    assert torch.equal(saved["classifier.weight"], ema["classifier.weight"])
    assert not torch.equal(saved["classifier.weight"], raw["classifier.weight"])


def test_tta_averages_an_image_and_its_mirror_in_eval_mode_only():
    from fastmbv1.models import build_model

    # BN statistics from data: at its default ones a fresh model's features vanish, and every
    # image, mirrored or not, would get the classifier's bias as its answer.
    model = with_data_statistics(build_model("mobilenet_v1", width=0.25, tta=True))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = model.logits(x)
        mirrored = model.logits(x.flip(3))
        torch.testing.assert_close(model(x), (plain + mirrored) / 2)
        torch.testing.assert_close(model(x.flip(3)), model(x))  # a mirror gets the same answer
    assert model.train()(x).shape == (4, 10)  # training sees single images


def test_six_view_tta_weighs_the_image_and_its_mirror_half():
    from fastmbv1.models import build_model

    model = with_data_statistics(
        build_model("mobilenet_v1", width=0.25, tta=True, tta_translate=True)
    )
    x = torch.rand(4, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    with torch.no_grad():
        pairs = [(model.logits(v) + model.logits(v.flip(3))) / 2 for v in views]
        torch.testing.assert_close(model(x), pairs[0] / 2 + (pairs[1] + pairs[2]) / 4)
    assert model.train()(x).shape == (4, 10)


def test_optimiser_groups_give_biases_their_own_lr_and_norms_their_own_decay():
    from fastmbv1.step import build_run, set_lr

    cfg = make_config({"preset": "cpu", "width": 0.25, "bias_lr": 16.0, "weight_decay": 4e-4,
                       "depthwise_decay": 1.0})  # fmt: skip
    run = build_run(cfg, torch.device("cpu"))
    weights, norms, biases = run.optimizer.param_groups
    model = run.model
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in weights["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in norms["params"]} == {id(m.weight) for m in bn}
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in bn} | {
        id(model.classifier.bias)
    }
    set_lr(run, 0.1)
    assert weights["lr"] == norms["lr"] == 0.1 and biases["lr"] == pytest.approx(1.6)
    # The same decay per step: lr * weight_decay is equal in every group.
    assert weights["weight_decay"] == norms["weight_decay"] == 4e-4
    assert biases["weight_decay"] == pytest.approx(2.5e-5)
    cfg = make_config({"preset": "cpu", "width": 0.25, "bn_decay": False, "depthwise_decay": 1})
    groups = build_run(cfg, torch.device("cpu")).optimizer.param_groups
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert groups[2]["weight_decay"] == 0.0
    # --depthwise-decay puts the depthwise filters, and only they, in a fourth group.
    cfg = make_config({"preset": "cpu", "width": 0.25, "depthwise_decay": 0.1})
    run = build_run(cfg, torch.device("cpu"))
    weights, _, _, depthwise = run.optimizer.param_groups
    dw = [m.weight for m in run.model.modules()
          if isinstance(m, torch.nn.Conv2d) and m.groups > 1]  # fmt: skip
    assert len(dw) == 13 and {id(p) for p in depthwise["params"]} == set(map(id, dw))
    assert {id(p) for p in weights["params"]} | set(map(id, dw)) == {
        id(p) for p in run.model.parameters() if p.ndim > 1
    }
    assert depthwise["weight_decay"] == pytest.approx(5e-5) and weights["weight_decay"] == 5e-4
    # The cpu recipe takes it off them (bench/results/ab-cpu-recipe.md).
    cfg = make_config({"preset": "cpu", "width": 0.25})
    assert build_run(cfg, torch.device("cpu")).optimizer.param_groups[3]["weight_decay"] == 0.0


def test_muon_takes_the_pointwise_weights_as_matrices_and_sgd_the_rest():
    from fastmbv1.optim import pointwise_weights
    from fastmbv1.step import build_run, set_lr, train_step

    cfg = make_config({"preset": "cpu", "width": 0.25, "muon": 0.5, "bias_lr": 4.0})
    run = build_run(cfg, torch.device("cpu"))
    pointwise = pointwise_weights(run.model)
    assert len(pointwise) == 13  # MobileNetV1's 13 blocks, one 1x1 conv each
    *sgd, muon = run.optimizer.param_groups
    in_sgd = {id(p) for g in sgd for p in g["params"]}
    assert in_sgd.isdisjoint(map(id, pointwise))
    assert in_sgd | {id(p) for p in pointwise} == {id(p) for p in run.model.parameters()}
    # Muon's parameters are the conv weights themselves, seen as (C_out, C_in).
    for w, m in zip(pointwise, muon["params"], strict=True):
        assert m.shape == w.shape[:2] and m.data_ptr() == w.data_ptr()
    set_lr(run, 0.1)
    assert muon["lr"] == pytest.approx(0.05) and sgd[2]["lr"] == pytest.approx(0.4)
    # One step: each pointwise weight moves by an orthogonalised matrix (Newton-Schulz takes
    # the gradient's leading singular values near 1; a small batch leaves the rank low),
    # after the decoupled decay. SGD's steps are nothing alike.
    before = [w.detach().clone() for w in pointwise]
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    train_step(run, x.contiguous(memory_format=torch.channels_last), y, y, 1.0)
    lr, decay = muon["lr"], muon["weight_decay"]
    assert decay == pytest.approx(5e-4 / (0.1 * 0.5))
    for w0, w in zip(before, pointwise, strict=True):
        rows, cols = w.shape[:2]
        step = (w0 * (1 - lr * decay) - w.detach()).view(rows, cols)
        step /= lr * max(1, rows / cols) ** 0.5  # torch's "original" LR adjustment
        sv = torch.linalg.svdvals(step)[:4]
        assert sv.min() > 0.5 and sv.max() < 1.3, (w.shape, sv)
    # zero_grad clears the 4-D weights' gradients too, as asked: zeroed or dropped.
    run.optimizer.zero_grad(set_to_none=False)
    assert all(w.grad is not None and not w.grad.any() for w in pointwise)
    run.optimizer.zero_grad()
    assert all(w.grad is None for w in pointwise)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_is_torchs_update_with_the_newton_schulz_dtype_chosen(nesterov):
    from fastmbv1.optim import Muon

    def steps(opt_class, dtype=None):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 24), (24, 8))]
        kwargs = {"lr": 0.05, "momentum": 0.9, "nesterov": nesterov, "weight_decay": 0.1}
        opt = (
            opt_class(params, **kwargs)
            if dtype is None
            else opt_class(params, **kwargs, ns_dtype=dtype)
        )
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params

    # In bfloat16 it is torch's, to the bit; in float32 it differs by bf16's rounding only.
    for ours, torchs in zip(steps(Muon, torch.bfloat16), steps(torch.optim.Muon), strict=True):
        assert torch.equal(ours, torchs)
    for ours, torchs in zip(steps(Muon, torch.float32), steps(torch.optim.Muon), strict=True):
        assert torch.allclose(ours, torchs, atol=0.01) and not torch.equal(ours, torchs)


def test_muon_orthogonalises_in_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    from fastmbv1.optim import ns_dtype

    assert ns_dtype(torch.device("cuda")) == torch.bfloat16
    for avx512_bf16, amx, expected in [(False, False, torch.float32), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16)]:  # fmt: skip
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert ns_dtype(torch.device("cpu")) == expected


def test_bn_momentum_reaches_every_batch_norm():
    from fastmbv1.step import build_run

    cfg = make_config({"preset": "cpu", "width": 0.25, "bn_momentum": 0.4})
    norms = [m for m in build_run(cfg, torch.device("cpu")).model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]  # fmt: skip
    assert norms and all(m.momentum == 0.4 for m in norms)


def test_the_whitened_stem_is_deterministic_and_whitens_the_patches():
    from fastmbv1.models.init import whiten_stem
    from fastmbv1.step import build_run

    images = np.random.default_rng(3).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    images[:, :, 16:] //= 2  # some structure, so the components differ
    cfg = make_config({"preset": "cpu", "width": 0.25, "whiten": True})
    stems = [build_run(cfg, torch.device("cpu"), images=images).model.stem[0].weight
             for _ in range(2)]  # fmt: skip
    torch.manual_seed(0)  # the default init draws from the seed; whitening does not
    plain = build_run(replace(cfg, whiten=False), torch.device("cpu")).model.stem[0].weight
    assert torch.equal(stems[0], stems[1]) and not torch.equal(stems[0], plain)
    w = stems[0].detach().flatten(1)  # 8 filters: 4 components and their negatives
    torch.testing.assert_close(w[4:], -w[:4])
    # Through the top filters the patches come out uncorrelated, each of variance about 1.
    model = build_run(cfg, torch.device("cpu"), images=images).model
    x = model.normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    patches = torch.nn.functional.unfold(x, 3).transpose(1, 2).flatten(0, 1)
    out = patches @ w[:4].T
    cov = out.T @ out / len(out)
    torch.testing.assert_close(cov, torch.eye(4), atol=0.02, rtol=0.02)
    whiten_stem(model, images[:100])  # other images, other filters
    assert not torch.equal(model.stem[0].weight, stems[0])


def test_whitening_leaves_a_network_without_a_conv_stem_as_it_is():
    # The cpu recipe whitens by default, and a registered network need not have a conv stem.
    from conftest import tiny_classifier

    from fastmbv1.models.init import whiten_stem

    model = tiny_classifier(width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whiten_stem(model, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_recipe_pipelines_take_the_configs_augmentation():
    from fastmbv1.data import recipe_pipeline

    images, labels = np.zeros((8, 32, 32, 3), np.uint8), np.arange(8)
    for translate, alternate in ((2, True), (4, False)):
        cfg = make_config({"preset": "cpu", "translate": translate, "alt_flip": alternate})
        cfg = resolve(cfg, torch.device("cpu"))[0]
        pipe = recipe_pipeline(cfg, images, labels, torch.device("cpu"), train=True, batch_size=4)
        assert (pipe.translate, pipe.alternate_flips) == (translate, alternate)


def test_without_the_depthwise_relu_the_run_builds_and_saves_that_network():
    from fastmbv1.step import build_run

    for relu in (True, False):
        cfg = make_config({"preset": "cpu", "width": 0.25, "depthwise_relu": relu})
        run = build_run(cfg, torch.device("cpu"))
        for block in run.model.blocks:
            assert isinstance(block.depthwise[-1], torch.nn.ReLU) == relu
        assert run.kwargs.get("depthwise_relu", True) == relu  # what final.pt records


def test_dirac_makes_each_pointwise_conv_the_identity_where_it_can():
    from fastmbv1.step import build_run

    cfg = make_config({"preset": "cpu", "width": 0.25, "dirac": True})
    for block in build_run(cfg, torch.device("cpu")).model.blocks:
        w = block.pointwise[0].weight[:, :, 0, 0]
        n = min(w.shape)
        torch.testing.assert_close(w[:n], torch.eye(*w.shape)[:n])


def test_a_time_driven_run_saves_that_it_was(tmp_path, data):
    from fastmbv1.checkpoint import latest_training_state

    # 10,000 epochs cannot fit 8 s: time drives the schedule from the first timed steps.
    cfg = tiny_config(tmp_path, data, epochs=10_000, budget=8.0, checkpoint_every=1)
    train(cfg, on_epoch=lambda record: record["epoch"] == 1)
    state, _ = latest_training_state(tmp_path / "run")
    assert state["totals"]["time_driven"]  # so the resumed clock starts time-driven


def test_a_resume_with_a_larger_budget_goes_on_from_the_schedule_s_progress(tmp_path, data):
    from fastmbv1.checkpoint import latest_training_state

    cfg = tiny_config(tmp_path, data, epochs=10_000, budget=60.0, checkpoint_every=1)
    train(cfg, on_epoch=lambda record: record["epoch"] == 1)
    run = tmp_path / "run"
    reached = latest_training_state(run)[0]["totals"]["progress"]
    train(resume_config(run, {"budget": 600.0}), resume=str(run),
          on_epoch=lambda record: record["epoch"] == 2)  # fmt: skip
    # By time alone the LR would go back up: far less of 600 s is used than of 60 s.
    assert latest_training_state(run)[0]["totals"]["progress"] > reached > 0.0


def test_a_resumed_run_keeps_the_reasons_for_its_fitted_recipe(tmp_path, data, monkeypatch):
    monkeypatch.setattr("fastmbv1.plan.measure_step", lambda *a, **k: {"images_per_s": 400.0})
    cfg = tiny_config(tmp_path, data, epochs=None, budget=30.0, checkpoint_every=1)
    train(cfg, on_epoch=lambda record: record["epoch"] == 1)  # stopped after one epoch
    run = tmp_path / "run"
    fitted = json.loads((run / "config.json").read_text())["why"]["epochs"]
    train(resume_config(run, {}), resume=str(run))
    assert json.loads((run / "config.json").read_text())["why"]["epochs"] == fitted
    assert json.loads((run / "summary.json").read_text())["why"]["epochs"] == fitted


def test_compile_pays_only_when_it_saves_more_than_it_costs():
    # 2,910 steps of 6 ms (the fast recipe as the review estimates it on an H100): 17.5 s of
    # eager training can never pay for a 60 s compile, even at an infinite speed-up.
    pays, saving = plan.compile_pays(60.0, 2910, 0.006)
    assert not pays and saving == pytest.approx(17.46)
    assert plan.compile_pays(60.0, 30_000, 0.006)[0]  # a long run can afford it
    # A measured compiled step bounds the saving: 30,000 steps at 6 ms -> 5 ms saves 30 s.
    pays, saving = plan.compile_pays(60.0, 30_000, 0.006, compiled_step_s=0.005)
    assert not pays and saving == pytest.approx(30.0)
    assert plan.compile_pays(20.0, 30_000, 0.006, compiled_step_s=0.005)[0]  # warm cache
