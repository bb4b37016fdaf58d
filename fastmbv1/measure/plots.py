"""Charts of ``fastmbv1 bench`` results, drawn from a result document as ``--save`` writes it.

One function per bench draws the document's measured rows (a row that carries only a note,
such as a pipeline skipped on this machine, is left out) on a bare matplotlib Figure on the
Agg canvas: no pyplot state and no display, so it draws in a test or over SSH alike.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastmbv1.errors import UserError, one_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
REFERENCE = ("torchvision", 0)  # the original project's loader: (pipeline, num_workers)


def agg_canvas():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UserError("plots need matplotlib: pip install -e '.[bench]'") from None
    return FigureCanvasAgg


def figure(width: float = 11, height: float = 5) -> Figure:
    """A bare Figure on the Agg canvas (no pyplot state, no display needed)."""
    canvas = agg_canvas()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    canvas(fig)
    return fig


def check_picture_path(path: str | Path) -> Path:
    """``path`` if a picture can be written there: checked before any measuring starts."""
    path = Path(path)
    formats = agg_canvas().get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise UserError(f"{path}: name a picture file, e.g. .png or .svg (not {path.suffix!r})")
    if not path.parent.is_dir():
        raise UserError(f"{path}: there is no folder {path.parent} to write it in")
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"{path}: cannot be written")
    return path


def save(fig: Figure, path: str | Path) -> None:
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror or one_line(e)})") from None


def read_result(path: str | Path) -> tuple[str, dict]:
    """Which bench wrote the result file at ``path`` (the word after ``bench`` in its
    command), and the file's document."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = getattr(e, "strerror", None) or one_line(e)
        raise UserError(f"{path}: unreadable ({why})") from None
    if not (isinstance(doc, dict) and {"command", "machine", "device", "results"} <= doc.keys()):
        raise UserError(f"{path}: not a fastmbv1 bench result file (its command, machine, ...)")
    try:
        words = shlex.split(doc["command"])
    except ValueError:
        words = []
    what = next((word for before, word in itertools.pairwise(words) if before == "bench"), None)
    if what in PLOTS:
        return what, doc
    raise UserError(f"{path}: its command is none of fastmbv1 bench {', '.join(PLOTS)}")


def measured(doc: dict, key: str) -> list[dict]:
    rows = [r for r in doc["results"] if isinstance(r, dict) and r.get(key) is not None]
    if not rows:
        raise UserError(f"no measured results to draw ({doc['command']})")
    return rows


def titles(fig: Figure, ax: Axes, doc: dict, what: str) -> None:
    v = doc.get("versions", {})
    fig.suptitle(what, fontweight="bold")
    ax.set_title(
        f"{doc['machine']} ({doc['device']}); torch {v.get('torch', '?')}, "
        f"DALI {v.get('dali') or '-'}",
        fontsize=9,
    )


def legend(ax: Axes) -> None:
    """The legend right of the axes, where it hides no bar and no label."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def pipeline_label(row: dict) -> str:
    workers = row.get("num_workers")
    return row["pipeline"] if workers is None else f"{row['pipeline']}, {workers} workers"


def grouped_bars(
    ax: Axes,
    groups: list[str],
    series: dict[str, dict[str, float]],
    label: Callable[[float], str],
) -> None:
    """A cluster of bars per group, a bar per series (a series maps group -> value; a group
    it lacks gets no bar), each bar labelled with its value."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        xs = [g + offset for g, group in enumerate(groups) if group in values]
        heights = [values[group] for group in groups if group in values]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=[label(h) for h in heights], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.margins(y=0.12)  # room above the tallest bar for its label
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_loaders(doc: dict) -> Figure:
    rows = measured(doc, "images_per_s")
    groups = list(dict.fromkeys(f"batch {r['batch_size']}" for r in rows))
    series: dict[str, dict[str, float]] = {}
    for r in rows:
        series.setdefault(pipeline_label(r), {})[f"batch {r['batch_size']}"] = r["images_per_s"]
    fig = figure()
    ax = fig.add_subplot()
    grouped_bars(ax, groups, series, lambda v: f"{v / 1000:,.1f}k")
    # The original loader, across each batch size's cluster: how far each pipeline is above it.
    references = [r for r in rows if (r["pipeline"], r.get("num_workers")) == REFERENCE]
    for i, r in enumerate(references):
        g = groups.index(f"batch {r['batch_size']}")
        ax.hlines(
            r["images_per_s"],
            g - 0.45,
            g + 0.45,
            colors="black",
            linestyles="--",
            label=None if i else "torchvision, num_workers=0 (the original project's loader)",
        )
    titles(fig, ax, doc, "Images per second each data pipeline delivers, over full epochs")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    legend(ax)
    return fig


def plot_step(doc: dict) -> Figure:
    rows = measured(doc, "images_per_s")
    # Settings that differ between rows tell the bars apart; the rest go in the title.
    settings = ("channels_last", "amp", "compile")
    varied = [s for s in settings if len({r[s] for r in rows}) > 1]
    fixed = [s for s in settings if s not in varied]

    def say(row: dict, names: list[str]) -> str:
        values = {True: "on", False: "off"}
        return ", ".join(f"{n} {values.get(row[n], row[n])}" for n in names)

    series: dict[str, dict[str, float]] = {}
    for r in rows:
        group = f"{r['model']}\nwidth {r['width']:g}"
        series.setdefault(say(r, varied) or "images/s", {})[group] = r["images_per_s"]
    groups = list(dict.fromkeys(f"{r['model']}\nwidth {r['width']:g}" for r in rows))
    roofline = [r for r in rows if r.get("layers")]  # results saved before the roofline: none
    fig = figure(11, 11) if roofline else figure()
    ax = fig.add_subplot(2, 1, 1) if roofline else fig.add_subplot()
    grouped_bars(ax, groups, series, lambda v: f"{v:,.0f}")
    batch = ", ".join(sorted({str(r["batch_size"]) for r in rows}))
    titles(fig, ax, doc, f"Training step alone, batch {batch}: images per second")
    ax.set_xlabel("model and width multiplier" + (f" ({say(rows[0], fixed)})" if fixed else ""))
    ax.set_ylabel("images / s")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    legend(ax)
    if roofline:
        labels = [f"{r['model']} width {r['width']:g}" + (f", {say(r, varied)}" if varied else "")
                  for r in roofline]  # fmt: skip
        draw_roofline(fig.add_subplot(2, 1, 2), roofline, labels)
    return fig


# How each kind of layer is marked on the roofline.
MARKERS = {"depthwise": "v", "pointwise": "o", "conv": "s", "bn+relu": "D", "relu": "D",
           "bn": "D", "linear": "^", "pool": "^", "normalize": "x", "sgd": "P"}  # fmt: skip
# Points named on the roofline: every layer but the many depthwise and pointwise convs, and
# the convs furthest from their bound.
NAMED_FURTHEST = 3


def draw_roofline(ax: Axes, rows: list[dict], labels: list[str]) -> None:
    """Log-log: each layer alone at its arithmetic intensity and the FLOP/s it reached,
    under this machine's roofs, min(peak FLOP/s, bandwidth x intensity), one per dtype."""
    from matplotlib.lines import Line2D  # matplotlib is optional: imported to draw only

    points = [layer for r in rows for layer in r["layers"] if layer.get("achieved_flops_per_s")]
    lo = min(p["intensity"] for p in points) / 2
    hi = max(p["intensity"] for p in points) * 2
    roofs = {(r["peak_dtype"], r["peak_flops_per_s"], r["bandwidth_bytes_per_s"]) for r in rows}
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, peak, bandwidth in sorted(roofs):
        ax.plot(xs, [min(peak, bandwidth * x) for x in xs], color="black", linewidth=1.5)
        ax.annotate(f"{dtype} matmul {peak / 1e9:,.1f} GFLOP/s", (hi, peak), ha="right",
                    va="bottom", fontsize=8)  # fmt: skip
        ridge = peak / bandwidth
        ax.annotate(f"copy {bandwidth / 1e9:,.1f} GB/s", (ridge / 4, bandwidth * ridge / 4),
                    rotation=30, fontsize=8, ha="center", va="bottom")  # fmt: skip
    colours = [f"C{i}" for i in range(len(rows))]
    for r, colour in zip(rows, colours, strict=True):
        layers = [layer for layer in r["layers"] if layer.get("achieved_flops_per_s")]
        furthest = sorted(layers, key=lambda layer: -layer["over_bound"])[:NAMED_FURTHEST]
        for layer in layers:
            x, y = layer["intensity"], layer["achieved_flops_per_s"]
            ax.scatter(x, y, color=colour, marker=MARKERS.get(layer["kind"], "o"), s=28)
            if layer in furthest or layer["kind"] not in ("depthwise", "pointwise"):
                ax.annotate(f" {layer['layer']} ({layer['over_bound']:.1f}x)", (x, y),
                            fontsize=7, color=colour)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(which="both", alpha=0.25)
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved, as fastmbv1.flops counts them)")
    ax.set_ylabel("FLOP/s reached, each layer alone")
    ax.set_title(
        "Roofline of the step: the roofs are this machine's matmul peak and copy bandwidth, "
        "measured; (Nx): the layer's time over its bound",
        fontsize=9,
    )
    kinds = dict.fromkeys(p["kind"] for p in points)
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=label)
               for c, label in zip(colours, labels, strict=True)]  # fmt: skip
    handles += [Line2D([], [], color="grey", marker=MARKERS.get(k, "o"), linestyle="", label=k)
                for k in kinds]  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def plot_epoch(doc: dict) -> Figure:
    rows = measured(doc, "epoch_s")
    names = [pipeline_label(r) for r in rows]
    compute = [r["compute_s"] for r in rows]
    wait = [r["data_wait_s"] for r in rows]
    fig = figure()
    ax = fig.add_subplot()
    ax.bar(names, compute, 0.6, label="computing (forward, backward, optimiser step)")
    bars = ax.bar(names, wait, 0.6, bottom=compute, label="waiting for the next batch")
    ax.bar_label(bars, labels=[epoch_label(r) for r in rows], padding=2)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    first = rows[0]
    titles(fig, ax, doc, f"One training epoch of preset {first['preset']}: data wait and compute")
    ax.set_xlabel(f"data pipeline ({first['images']:,} images in batches of {first['batch_size']})")
    ax.set_ylabel("seconds")
    legend(ax)
    return fig


def epoch_label(row: dict) -> str:
    """AU, MLPerf's accelerator utilisation, over each bar (results saved before it: the
    share of the epoch spent waiting)."""
    if "au" in row:
        return f"AU {row['au']:.0%}, {row['bound']}-bound"
    return f"{row['data_share']:.0%} waiting"


def plot_budget(doc: dict) -> Figure:
    rows = measured(doc, "s_per_epoch")
    budgets = [k for k in rows[0] if k.startswith("epochs_in_")]
    ours = doc["machine"]

    def group(r: dict) -> str:
        where = "batch" if r["device"] == doc["device"] else f"{r['device']}, batch"
        return f"{r['run']}\n({where} {r['batch_size']})"

    groups = [group(r) for r in rows]
    series = {
        f"in {k.removeprefix('epochs_in_')[:-1]} s": {group(r): r[k] for r in rows} for k in budgets
    }
    fig = figure(12, 5.5)
    ax = fig.add_subplot()
    grouped_bars(ax, groups, series, lambda v: f"{v:.0f}")
    for g, r in enumerate(rows):
        ax.hlines(
            r["epochs"],
            g - 0.45,
            g + 0.45,
            colors="black",
            linestyles="--",
            label=None if g else "epochs in the recipe (original runs: epochs run)",
        )
    fig.suptitle("Epochs that fit into each budget (each with its evaluation)", fontweight="bold")
    others = sorted({r["device"] for r in rows if r["device"] != doc["device"]})
    ax.set_title(
        f"presets measured on {ours} ({doc['device']})"
        + (f"; beside them the original project's runs on {', '.join(others)}" if others else ""),
        fontsize=9,
    )
    ax.set_xlabel("run")
    ax.set_ylabel("epochs")
    ax.tick_params(axis="x", labelsize=8)
    legend(ax)
    return fig


PLOTS: dict[str, Callable[[dict], Figure]] = {
    "loaders": plot_loaders,
    "step": plot_step,
    "epoch": plot_epoch,
    "budget": plot_budget,
}
