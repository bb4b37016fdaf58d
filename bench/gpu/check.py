"""The GPU check: loaders, the training step, the epoch profile, one training run.

Run by ``bench/gpu/check.sh`` (which joins the carried data and packages first). Each phase
is a ``fastmbv1 bench`` command run in this process; its JSON file under ``--out`` is
rewritten after every measurement, and a phase starts no new measurement once its share of
``--seconds`` is spent, so a timeout still leaves everything measured so far. At the end,
``predicted.json`` puts ``fastmbv1 bench roofline``'s prediction for this card beside what
the phases measured, so that the first lent GPU checks the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fastmbv1.cli import build_parser
from fastmbv1.config import PRESETS
from fastmbv1.machine import device_name, pick_device
from fastmbv1.measure.cli import BENCHES
from fastmbv1.measure.gpus import GPUS
from fastmbv1.measure.inputs import TRACE_STEPS
from fastmbv1.measure.report import report
from fastmbv1.measure.results import document, write_document
from fastmbv1.measure.roofline import predict
from fastmbv1.step import compile_problem

# Seconds kept for the training run's own start (imports, data) and its final save.
TRAIN_MARGIN_S = 30


def plan(
    device: str, data: list[str], quick: bool, out: Path, compiles: bool
) -> list[tuple[str, float, list[str]]]:
    """(phase, seconds, ``fastmbv1 bench`` arguments), most telling measurements first."""
    size = ["--images", "512"] if quick else []
    cores = os.cpu_count()
    step = [
        "step",
        "--device",
        device,
        "--models",
        "mobilenet_v1",
        "--widths",
        "1.0",
        "0.5",
        "--channels-last",
        "on",
        "off",
        "--amp",
        "bf16",
        "off",
    ]
    if quick:
        step += ["--batch-size", "32", "--steps", "2", "--warmup", "1"]
    phases = [
        ("loaders", 40, ["loaders", "--device", device, *data, *size, "--pipelines", "torch",
                         "dali", "torchvision", f"torchvision:num_workers={cores}",
                         "--batch-sizes", "512", "100"]),
        # Eager first: compiling takes most of a minute per combination.
        ("step", 30, [*step, "--compile", "off"]),
        ("step-compile", 110, [*step, "--compile", "on"]),
        ("epoch", 70, ["epoch", "--device", device, *data, *size, "--preset", "fast",
                       "--pipelines", "torch", "dali", f"torchvision:num_workers={cores}",
                       "resident", "--trace", f"{out}/traces"]),
        # The eager step of the fast preset's model, traced: its kernels per step, counted.
        ("kernels", 20, ["step", "--device", device, "--models", "mobilenet_v1", "--widths",
                         "1.0", "--channels-last", "on", "--amp", "bf16", "--compile", "off",
                         "--steps", "3", "--warmup", "1", "--trace", f"{out}/traces-step",
                         *(["--batch-size", "32"] if quick else [])]),
    ]  # fmt: skip
    # Compiling on a CPU takes minutes: a dry run leaves it out, as does a failed probe.
    return [p for p in phases if (compiles and not quick) or p[0] != "step-compile"]


def run_phase(name: str, argv: list[str], deadline: float, out: Path) -> None:
    args = build_parser().parse_args(["bench", *argv])
    device = pick_device(args.device)
    command = shlex.join(["fastmbv1", "bench", *argv])
    table = BENCHES[args.bench](args, device)
    rows: list[dict] = []
    write_document(document(command, device, rows), out / f"{name}.json")
    for row in table.rows:
        rows.append(row)
        write_document(document(command, device, rows), out / f"{name}.json")
        print(f"{name}: {json.dumps(row)}", flush=True)
        if time.monotonic() > deadline:
            rows.append({"note": f"stopped: the {name} phase's time was spent"})
            write_document(document(command, device, rows), out / f"{name}.json")
            return


def train_run(
    device: str, data: str, seconds: float, out: Path, quick: bool, name: str, ddp: bool
) -> None:
    """One default-preset ``fastmbv1 train`` (quick: a tiny one) into ``out/name``; with
    ``ddp``, the same under ``torchrun`` with one rank, so DDP's cost per step shows."""
    run_dir = out / name
    launch = [sys.executable, "-m"]
    if ddp:
        launch += ["torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    argv = [*launch, "fastmbv1", "train", "--device", device, "--overwrite", "--data", data,
            "--budget", f"{seconds:.0f}", "--out", str(run_dir)]  # fmt: skip
    if quick:
        argv += ["--preset", "cpu", "--width", "0.25", "--train-limit", "1024",
                 "--test-limit", "500", "--epochs", "2"]  # fmt: skip
    print(f"{name}:", shlex.join(argv), flush=True)
    with open(out / f"{name}.log", "w") as log:
        try:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            print(f"{name}: killed after {seconds + 120:.0f} s", flush=True)


def compare_ddp(out: Path, names: list[str]) -> None:
    """``ddp.json``: the median images/s of each run's epochs after its first (which
    compiles), so a step with DDP reads against one without."""
    result = {}
    for name in names:
        path = out / name / "metrics.jsonl"
        speeds = sorted(json.loads(line)["images_per_s"] for line in path.open().readlines()[1:])
        result[name] = speeds[len(speeds) // 2] if speeds else None
    (out / "ddp.json").write_text(json.dumps(result, indent=1) + "\n")
    print("ddp:", json.dumps(result), flush=True)


def card_of(name: str) -> str | None:
    """The name bench roofline knows this GPU by (h100 for "NVIDIA H100 80GB HBM3"), or None."""
    return next((key for key in GPUS if key in name.lower()), None)


def kernels_per_step(folder: Path) -> float | None:
    """CUDA kernels per step in the first step trace under ``folder`` (TRACE_STEPS steps)."""
    traces = sorted(folder.glob("**/*.pt.trace.json"))
    if not traces:
        return None
    events = json.loads(traces[0].read_text()).get("traceEvents", [])
    return sum(e.get("cat") == "kernel" for e in events) / TRACE_STEPS


def measured_rows(out: Path, phase: str) -> list[dict]:
    path = out / f"{phase}.json"
    return json.loads(path.read_text())["results"] if path.is_file() else []


def beside(out: Path, device, card: str | None) -> None:
    """``predicted.json``: ``fastmbv1 bench roofline --gpu CARD`` for every preset, the
    ``fast`` row with what this check measured of it beside the model: the step (eager and
    compiled, width 1.0, bf16, channels_last), each pipeline's epoch scaled to 50,000
    images, and the kernels per eager step counted in its trace. ``card``: the card to
    predict (default: the one the device's name names)."""
    card = card or card_of(device_name(device))
    if card is None:
        print(f"predicted: no datasheet for {device_name(device)} in fastmbv1.measure.gpus")
        return
    rows = [predict(preset, GPUS[card]) for preset in PRESETS]
    fast = rows[0]

    def step_s(phase: str, compiled: bool) -> float | None:
        like = {"model": "mobilenet_v1", "width": 1.0, "amp": "bf16", "channels_last": True}
        found = [r for r in measured_rows(out, phase) if like.items() <= r.items()
                 and r.get("compile") == compiled and "step_s" in r]  # fmt: skip
        return found[0]["step_s"] if found else None

    fast["measured_step_s_eager"] = step_s("step", False)
    fast["measured_step_s_compiled"] = step_s("step-compile", True)
    fast["measured_epoch_s"] = {
        r["pipeline"]: r["epoch_s"] * fast["steps_per_epoch"] * r["batch_size"] / r["images"]
        for r in measured_rows(out, "epoch")
        if "epoch_s" in r
    }
    fast["measured_kernels_per_step_eager"] = kernels_per_step(out / "traces-step")
    command = f"bench/gpu/check.py: fastmbv1 bench roofline --gpu {card}, measured beside it"
    write_document(document(command, device, rows), out / "predicted.json")
    print("predicted:", json.dumps(fast), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--data", default=os.environ.get("FASTMBV1_DATA"))
    parser.add_argument("--seconds", type=float, default=470, help="the whole check")
    parser.add_argument("--train-budget", type=float, default=240)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run")
    parser.add_argument(
        "--card", choices=sorted(GPUS), help="the card predicted.json models (default: this one)"
    )
    args = parser.parse_args()
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    has_data = bool(args.data) and Path(args.data).exists()
    # Without the data set the bench phases still measure on random images; training can't.
    data = ["--data", args.data] if has_data else ["--synthetic"]
    # First of all, whether torch.compile works here at all (a C compiler for Triton...).
    device = pick_device(args.device)
    problem = compile_problem(device)
    print(f"compile probe: {problem or 'ok'}", flush=True)
    phases = plan(args.device, data, args.quick, out, problem is None)
    write_document(document(shlex.join(sys.argv), device,
                            [{"data": args.data if has_data else None, "compile_problem": problem,
                              "plan": [shlex.join(argv) for _, _, argv in phases]}]),
                   out / "env.json")  # fmt: skip
    deadline = start
    for name, seconds, argv in phases:
        deadline += seconds
        try:
            run_phase(name, argv, deadline, out)
        except Exception as e:  # one failed phase must not cost the others their time
            print(f"{name}: failed: {e!r}", flush=True)
            (out / f"{name}.error.txt").write_text(f"{e!r}\n")
    beside(out, device, args.card)
    left = args.seconds - (time.monotonic() - start) - 2 * TRAIN_MARGIN_S
    budget = min(args.train_budget, left)
    if not has_data:
        print("train: skipped, no CIFAR-10 (set FASTMBV1_DATA or carry .gpu/cifar.*)")
    elif budget < 40:
        print(f"train: skipped, only {left:.0f} s left")
    else:
        # Two thirds to the plain run, the rest to the same under DDP with one rank.
        runs = [("train-fast", False, budget * 2 / 3), ("train-fast-ddp1", True, budget / 3)]
        for name, ddp, seconds in runs:
            train_run(args.device, args.data, seconds, out, args.quick, name, ddp)
        done = [name for name, _, _ in runs if (out / name / "metrics.jsonl").is_file()]
        if done:
            report([out / name for name in done], out)
            compare_ddp(out, done)
    print(f"check done in {time.monotonic() - start:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()
