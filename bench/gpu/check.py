"""The GPU check: training runs first, then the loaders, the training step and the epoch.

Run by ``bench/gpu/check.sh`` (which joins the carried data and packages first). The
training runs come first, each with a budget reserved for it: what the check is for is
what a run costs and gains on a GPU (CUDA graphs, compiling, DDP), and the benches then
share whatever time is left. Each bench phase is a ``fastmbv1 bench`` command run in this
process, and starts no new measurement once its share is spent. Everything is written
under ``--work`` as it comes and packed into ``--out`` after every phase
(``results.tar.gz``, ``check.json``; the device machine returns at most 8 files), so a
timeout still returns what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastmbv1.cli import build_parser
from fastmbv1.distributed import FORCE_DDP
from fastmbv1.machine import pick_device
from fastmbv1.measure.cli import BENCHES
from fastmbv1.measure.report import report
from fastmbv1.measure.results import document, write_document
from fastmbv1.step import compile_problem

# Seconds a training run may overrun its --budget (start, final save) before it is killed.
TRAIN_GRACE_S = 60
# Seconds kept for packing the results at the end.
END_MARGIN_S = 10


@dataclass
class Phase:
    name: str
    seconds: float  # a training run's --budget; a bench phase's share of what is left
    argv: list[str]  # the training command, or `fastmbv1 bench` arguments
    env: dict[str, str] = field(default_factory=dict)
    train: bool = False


def train_phase(
    name: str, seconds: float, device: str, data: str, work: Path, quick: bool,
    flags: tuple[str, ...] = (), ddp: bool = False,
) -> Phase:  # fmt: skip
    """A ``fastmbv1 train`` run into ``work/name`` (quick: a tiny one); with ``ddp``, under
    ``torchrun`` with one rank, forced through the process group and the DDP wrapper."""
    launch, env = [sys.executable, "-m"], {}
    if ddp:
        launch += ["torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
        env[FORCE_DDP] = "1"
    argv = [*launch, "fastmbv1", "train", "--device", device, "--overwrite", "--data", data,
            "--budget", f"{seconds:.0f}", "--out", str(work / name), *flags]  # fmt: skip
    if quick:
        argv += ["--preset", "cpu", "--width", "0.25", "--train-limit", "1024",
                 "--test-limit", "500", "--epochs", "2"]  # fmt: skip
    return Phase(name, seconds, argv, env, train=True)


def plan(
    device: str, data: str | None, quick: bool, work: Path, compiles: bool, artifacts: Path
) -> list[Phase]:
    """The phases in order: training runs (if there is data), then the benches."""
    phases = []
    if data:
        runs = [
            # The plain command: CUDA graphs on, compiled only if it pays back (plan.py).
            ("train-fast", 90, (), False),
            # Op by op, not compiled: the reference for CUDA graphs and for DDP.
            ("train-eager", 60, ("--no-cuda-graphs", "--no-compile"), False),
            # The same under DDP with one rank (graphs are off under DDP).
            ("train-eager-ddp1", 60, ("--no-cuda-graphs", "--no-compile"), True),
        ]
        if compiles and not quick:  # compiling on a CPU takes minutes: a dry run leaves it out
            flags = ("--compile", "--compile-artifacts", str(artifacts))
            runs.append(("train-compiled", 150, flags, False))
        for name, seconds, flags, ddp in runs:
            phases.append(train_phase(name, seconds, device, data, work, quick, flags, ddp))
    size = ["--images", "512"] if quick else []
    source = ["--data", data] if data else ["--synthetic"]
    cores = os.cpu_count()
    step = ["step", "--device", device, "--models", "mobilenet_v1", "--channels-last", "on"]
    graphs = ["--cuda-graphs", "on", "off"] if device == "cuda" else ["--cuda-graphs", "off"]
    if quick:
        step += ["--batch-size", "32", "--steps", "2", "--warmup", "4"]
    phases += [
        Phase("loaders", 25, ["loaders", "--device", device, *source, *size, "--pipelines",
                              "torch", "dali:chunk=1", "dali", "torchvision",
                              f"torchvision:num_workers={cores}", "--batch-sizes", "512", "100"]),
        Phase("step", 35, [*step, "--widths", "1.0", "0.5", "--channels-last", "on", "off",
                           "--amp", "bf16", "off", "--compile", "off", *graphs]),
        # The fast recipe's combination only: one compile each, warm after train-compiled.
        Phase("step-compile", 40, [*step, "--widths", "1.0", "--amp", "bf16", "--compile", "on",
                                   *graphs]),
        Phase("epoch", 40, ["epoch", "--device", device, *source, *size, "--preset", "fast",
                            "--pipelines", "torch", "dali", f"torchvision:num_workers={cores}",
                            "--trace", str(work / "traces")]),
    ]  # fmt: skip
    return [p for p in phases if (compiles and not quick) or p.name != "step-compile"]


def run_bench(phase: Phase, deadline: float, work: Path) -> None:
    args = build_parser().parse_args(["bench", *phase.argv])
    device = pick_device(args.device)
    command = shlex.join(["fastmbv1", "bench", *phase.argv])
    table = BENCHES[args.bench](args, device)
    rows: list[dict] = []
    path = work / f"{phase.name}.json"
    write_document(document(command, device, rows), path)
    for row in table.rows:
        rows.append(row)
        write_document(document(command, device, rows), path)
        print(f"{phase.name}: {json.dumps(row)}", flush=True)
        if time.monotonic() > deadline:
            rows.append({"note": f"stopped: the {phase.name} phase's time was spent"})
            write_document(document(command, device, rows), path)
            return


def run_train(phase: Phase, work: Path) -> None:
    print(f"{phase.name}:", shlex.join(phase.argv), flush=True)
    with open(work / f"{phase.name}.log", "w") as log:
        try:
            subprocess.run(
                phase.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **phase.env},
                timeout=phase.seconds + TRAIN_GRACE_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            print(f"{phase.name}: killed after {phase.seconds + TRAIN_GRACE_S:.0f} s", flush=True)


def run_figures(work: Path, names: list[str]) -> dict:
    """Per training run: the median images/s of its epochs after the first (which warms up
    and compiles), and what its summary says of compiling, CUDA graphs and DDP."""
    figures = {}
    for name in names:
        metrics, summary = work / name / "metrics.jsonl", work / name / "summary.json"
        if not summary.is_file():
            figures[name] = None
            continue
        lines = metrics.read_text().splitlines()[1:]
        speeds = sorted(json.loads(line)["images_per_s"] for line in lines)
        s = json.loads(summary.read_text())
        config = json.loads((work / name / "config.json").read_text())
        figures[name] = {
            "median_images_per_s": speeds[len(speeds) // 2] if speeds else None,
            "final_test_acc": s["final_test_acc"], "epochs": s["epochs_done"],
            "wall_s": s["wall_s"], "train_s": s["train_s"], "compile_s": s["compile_s"],
            "compile": s.get("compile"), "cuda_graphs": config.get("cuda_graphs"),
            "ddp": s.get("ddp"), "why": s.get("why"),
        }  # fmt: skip
    return figures


def pack(work: Path, out: Path, results: dict) -> None:
    """``out/check.json`` and ``out/results.tar.gz`` (everything in ``work`` but the saved
    models), each replaced whole."""
    (out / ".check.json").write_text(json.dumps(results, indent=1) + "\n")
    os.replace(out / ".check.json", out / "check.json")
    with tarfile.open(out / ".results.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=".", filter=lambda t: None if t.name.endswith(".pt") else t)
    os.replace(out / ".results.tar.gz", out / "results.tar.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    parser.add_argument("--work", default="/tmp/fastmbv1-check", help="where phases write")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--data", default=os.environ.get("FASTMBV1_DATA"))
    parser.add_argument("--seconds", type=float, default=470, help="the whole check")
    parser.add_argument(
        "--artifacts", help="compiled artifacts: loaded if the file exists, else written there"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a dry run")
    args = parser.parse_args()
    start = time.monotonic()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    artifacts = Path(args.artifacts or out / "compile-artifacts.bin")
    data = args.data if args.data and Path(args.data).exists() else None
    # First of all, whether torch.compile works here at all (a C compiler for Triton...).
    device = pick_device(args.device)
    problem = compile_problem(device)
    print(f"compile probe: {problem or 'ok'}", flush=True)
    phases = plan(args.device, data, args.quick, work, problem is None, artifacts)
    results = {
        "command": shlex.join(sys.argv), "data": data, "compile_problem": problem,
        "artifacts": {"path": str(artifacts), "carried": artifacts.is_file()},
        "plan": [{"phase": p.name, "seconds": p.seconds, "command": shlex.join(p.argv),
                  "env": p.env} for p in phases],
        "done": [],
    }  # fmt: skip
    write_document(document(shlex.join(sys.argv), device, [results]), work / "env.json")
    if not data:
        print("training runs: skipped, no CIFAR-10 (set FASTMBV1_DATA or carry .gpu/cifar.*)")
    trains = [p for p in phases if p.train]
    for phase in trains:
        run_train(phase, work)
        results["done"].append(phase.name)
        results["runs"] = run_figures(work, [p.name for p in trains])
        pack(work, out, results)
    done = [p.name for p in trains if (work / p.name / "metrics.jsonl").is_file()]
    if done:
        report([work / name for name in done], work)
    # The benches share what is left, in proportion to their shares.
    benches = [p for p in phases if not p.train]
    left = args.seconds - (time.monotonic() - start) - END_MARGIN_S
    scale = max(left, 0.0) / sum(p.seconds for p in benches)
    deadline = time.monotonic()
    for phase in benches:
        deadline += phase.seconds * scale
        try:
            run_bench(phase, deadline, work)
        except Exception as e:  # one failed phase must not cost the others their time
            print(f"{phase.name}: failed: {e!r}", flush=True)
            (work / f"{phase.name}.error.txt").write_text(f"{e!r}\n")
        results["done"].append(phase.name)
        pack(work, out, results)
    results["seconds"] = time.monotonic() - start
    pack(work, out, results)
    print(f"check done in {results['seconds']:.0f} s; results in {out}", flush=True)
    print("runs:", json.dumps(results.get("runs"), indent=1), flush=True)


if __name__ == "__main__":
    main()
