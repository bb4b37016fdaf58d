"""What a run reports: metrics.jsonl per epoch, time-to-accuracy, summary.json, the terminal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

THRESHOLDS = (80, 85, 90, 92, 93, 94)


class RunLog:
    """Appends one JSON line per epoch and tracks when each accuracy threshold was first met.

    A progress bar per epoch when stderr is a terminal; one plain line per epoch otherwise.
    With ``tb``, the same metrics also go to TensorBoard event files in ``out/tb``.
    """

    def __init__(
        self, out: Path, *, records: list[dict] | None = None, write: bool = True, tb: bool = False
    ):
        self.path = out / "metrics.jsonl"
        self.write = write  # False on ranks other than 0: keep the records, write nothing
        self.tb = None
        if tb and write:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(out / "tb")
        self.records: list[dict] = []
        self.tta: dict[str, dict | None] = {str(t): None for t in THRESHOLDS}
        self.interactive = write and sys.stderr.isatty()
        # Rewrite what a resumed run already had, so the file matches its checkpoint exactly.
        if write:
            self.path.write_text("")
        for r in records or []:
            self.add(r, quiet=True)

    def bar(self, epoch: int, steps: int):
        return tqdm(
            total=steps,
            desc=f"epoch {epoch}",
            leave=False,
            disable=not self.interactive,
            unit="step",
            dynamic_ncols=True,
        )

    def add(self, record: dict, quiet: bool = False) -> None:
        self.records.append(record)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        acc = record.get("test_acc")
        if acc is not None:
            for t in THRESHOLDS:
                if acc >= t and self.tta[str(t)] is None:
                    self.tta[str(t)] = {
                        "epoch": record["epoch"],
                        "train_s": record["train_s_total"],
                        "wall_s": record["wall_s"],
                    }
        if self.write and not quiet:
            print(format_record(record), flush=True)
        if self.tb is not None:
            self.tensorboard(record)

    def tensorboard(self, r: dict) -> None:
        """One epoch's scalars, by epoch: what metrics.jsonl holds, and the data-wait share."""
        scalars = {
            "lr": r["lr"],
            "loss/train": r["train_loss"],
            "accuracy/train": r["train_acc"],
            "accuracy/test": r["test_acc"],
            "speed/images_per_s": r["images_per_s"],
            "time/data_wait_share": r["data_wait_s"] / max(r["train_s"], 1e-9),
            "time/eval_s": r["eval_s"],
            "time/wall_s": r["wall_s"],
        }
        for tag, value in scalars.items():
            if value is not None:
                self.tb.add_scalar(tag, value, r["epoch"])
        self.tb.flush()  # a run that diverges or is killed keeps every epoch logged so far

    def close(self, summary: dict) -> None:
        """Mark the time to each accuracy reached (wall seconds, at its epoch) and close."""
        if self.tb is None:
            return
        for t, hit in summary["time_to_accuracy"].items():
            if hit is not None:
                self.tb.add_scalar(f"time_to_accuracy/{t}%_wall_s", hit["wall_s"], hit["epoch"])
        self.tb.add_text("summary", f"```\n{json.dumps(summary, indent=2)}\n```")
        self.tb.close()

    def start(self, config: dict, resumed_after: int | None = None) -> dict[str, str]:
        """Say what runs, and why the machine-dependent choices went as they did; write
        ``config.json``. ``config`` is the resolved config with its ``why`` notes; returns
        them, with those of the run's start kept when it is resumed."""
        saved = self.path.parent / "config.json"
        if resumed_after is not None and saved.is_file():  # the start's reasons still hold
            config = {
                **config,
                "why": {**json.loads(saved.read_text()).get("why", {}), **config["why"]},
            }
        if not self.write:
            return config["why"]
        for name, because in config.get("why", {}).items():
            print(f"{name} {because}", file=sys.stderr, flush=True)
        print("config:", json.dumps(config), flush=True)
        write_json(self.path.parent / "config.json", config)
        if self.tb is not None:
            self.tb.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")
        if resumed_after is not None:
            print(f"resuming {self.path.parent} after epoch {resumed_after}", flush=True)
        return config["why"]


def format_record(r: dict) -> str:
    test = f"{r['test_acc']:6.2f}%" if r.get("test_acc") is not None else "   -   "
    loss = f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "   -  "
    return (
        f"epoch {r['epoch']:3d}  lr {r['lr']:.4f}  loss {loss}  "
        f"train {r['train_acc']:6.2f}%  test {test}  {r['images_per_s']:8.0f} img/s  "
        f"wait {r['data_wait_s']:6.2f}s  train {r['train_s']:7.1f}s  wall {r['wall_s']:7.1f}s"
    )


def format_summary(s: dict) -> str:
    cache = (s.get("compile") or {}).get("cache")
    lines = [
        f"final test accuracy {s['final_test_acc']:.2f} % after {s['epochs_done']} epochs",
        f"training {s['train_s']:.1f} s, evaluation {s['eval_s']:.1f} s, wall {s['wall_s']:.1f} s"
        f" (compile {s['compile_s']:.1f} s{f', cache {cache}' if cache else ''}), "
        f"stopped by {s['stopped_by']}",
        "reached   epoch   train s    wall s",
    ]
    for t, hit in s["time_to_accuracy"].items():
        if hit is None:
            lines.append(f"  {t:>3} %      -         -         -")
        else:
            lines.append(
                f"  {t:>3} %  {hit['epoch']:6d}  {hit['train_s']:8.1f}  {hit['wall_s']:8.1f}"
            )
    return "\n".join(lines)


def write_json(path: Path, obj: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves half a config or summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
