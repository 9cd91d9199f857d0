"""Pictures of a run: training curves from metrics.jsonl and per-class accuracy from val.py.

  python -m utils.reports.plots OUTPUT_DIR     # (re)write OUTPUT_DIR/curves.png
"""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import json
import logging
import os
import sys
import textwrap
from typing import Optional

from utils.errors import optional_output
from utils.io.files import write_atomically

CURVES = "curves.png"
# Noto Sans CJK SC (SIL Open Font License) inside the mplfonts package.
CJK_FONT = ("fonts", "NotoSansCJKsc-Regular.otf")
CURVES_INCHES = (10, 7)  # at 100 dpi
# Beyond this many classes the per-class bars are sorted by accuracy: a hundred bars in class
# order show nothing, sorted they show the spread and name the worst classes.
SORT_CLASSES_BEYOND = 20
# Beyond 2 × EXTREMES classes the chart names only the best and the worst EXTREMES (a hundred
# bars side by side would need 5-pixel labels), beside a histogram of every class's top-1.
EXTREMES = 15
HISTOGRAM_BINS = 20

# Paddle's import sets the root logger to INFO with a handler, which would print matplotlib's
# one-off "generated new fontManager" record in a fresh environment.
logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _save(figure, path):
    """Render ``figure`` as PNG and write it atomically (never through a symbolic link)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())


def _figure(**kwargs):
    """A matplotlib Figure outside pyplot: written to files, never shown, backend untouched
    (a notebook's inline plots keep working); Chinese text drawn (:func:`cjk_font`)."""
    from matplotlib.figure import Figure

    cjk_font()
    return Figure(**kwargs)


@functools.cache
def cjk_font() -> Optional[str]:
    """Let charts draw Simplified Chinese (a class folder named 圆形): register the Noto Sans
    CJK SC font that the ``mplfonts`` package ships and add it to matplotlib's font families
    after the default, so that every glyph the default font lacks is drawn from it
    (matplotlib never looks for an installed CJK font by itself). Returns the font's name,
    or ``None`` without the package."""
    import matplotlib
    from matplotlib import font_manager

    spec = importlib.util.find_spec("mplfonts")  # located, not imported: it has a CLI
    path = spec and os.path.join(spec.submodule_search_locations[0], *CJK_FONT)
    if not path or not os.path.isfile(path):
        return None
    name = None
    with optional_output(f"the Chinese font {path}"):  # damaged: charts without it
        font_manager.fontManager.addfont(path)
        name = font_manager.FontProperties(fname=path).get_name()
    if name is None:
        return None
    families = list(matplotlib.rcParams["font.family"])
    if name not in families:  # after the default family: each glyph it lacks falls back
        matplotlib.rcParams["font.family"] = [*families, name]
    return name


def read_metrics(output_dir: str) -> tuple[list[dict], list[dict]]:
    """The epoch records of ``output_dir/metrics.jsonl``."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        from utils.errors import UserError

        raise UserError(f"no metrics.jsonl in {output_dir}; train first")
    records = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line.decode("utf-8")) if line.strip() else None
            except ValueError:
                record = "damaged"
            if isinstance(record, dict) and "test" in record:
                continue  # the final test records: not epochs
            if record is not None and not (isinstance(record, dict)
                                           and type(record.get("stage")) is int):
                from utils.errors import UserError

                raise UserError(f"line {number} of {path} is damaged; it is not an epoch record")
            if record is not None:
                records.append(record)
    return records


def plot_curves(output_dir: str) -> Optional[str]:
    """Write ``curves.png``: loss parts, learning rate, gradient norm and validation top-1
    per epoch, with the stages shaded; return its path."""
    records = read_metrics(output_dir)
    epochs = list(range(1, len(records) + 1))
    # Two by two at 1000 x 700 pixels: a README or a notebook shows it about that wide, so its
    # text stays readable (four panels in a row were shrunk to half their size).
    figure = _figure(figsize=CURVES_INCHES)
    (loss_ax, lr_ax), (grad_ax, top1_ax) = figure.subplots(2, 2)
    # The loss parts the run recorded (train_<part>, in their order: losses/parts.py).
    parts = list(dict.fromkeys(key for r in records for key in r if key.startswith("train_")))
    for name, style in zip(parts, itertools.cycle(("-", "--", ":", "-."))):
        loss_ax.plot(epochs, [_number(r.get(name)) for r in records], style,
                     label=name[len("train_"):])
    loss_ax.set(title="training loss (per sample)", xlabel="epoch")
    lr_ax.plot(epochs, [_number(r.get("lr")) for r in records], color="tab:purple")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for key, style, label in (("grad_norm", "-", "mean"), ("grad_norm_max", ":", "max")):
        grad_ax.plot(epochs, [_number(r.get(key)) for r in records], style, marker=".",
                     color="tab:red", label=label)
    grad_ax.set(title="gradient norm before clipping", xlabel="epoch", yscale="log")
    grad_ax.legend()
    for key, label in (("val_top1", "raw"), ("val_top1_ema", "EMA"), ("val_top1_swa", "SWA")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            top1_ax.plot(epochs, [_number(v) for v in values], marker=".", label=label)
    top1_ax.set(title="validation top-1", xlabel="epoch", ylim=(0, 1))
    for axis in (loss_ax, lr_ax, grad_ax, top1_ax):
        _shade_stages(axis, records)
        axis.grid(alpha=0.3)
    loss_ax.legend()
    top1_ax.legend(loc="center right")
    figure.tight_layout()
    path = os.path.join(output_dir, CURVES)
    _save(figure, path)
    return path


def curves_at_end(output_dir: str, stopped_by: Optional[str] = None) -> None:
    """Draw curves.png at a run's end and say where, or say why not: a stop (``stopped_by``,
    e.g. "SIGINT") after the last epoch skips it, an edited metrics.jsonl is a warning."""
    if stopped_by:  # after the last epoch: nothing is left to interrupt
        print(f"{stopped_by} after the last epoch: training is complete; curves.png skipped "
              f"(python -m utils.reports.plots {output_dir} draws it)", flush=True)
        return
    with optional_output("curves.png"):
        print(f"curves in {plot_curves(output_dir)}", flush=True)


def _number(value):
    """A plottable value: anything not a number (``None``: not measured) becomes a gap."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else float("nan")


def _shade_stages(axis, records):
    """Alternate the background per stage and name each stage at the top."""
    start = 0
    for index in range(1, len(records) + 1):
        if index == len(records) or records[index]["stage"] != records[start]["stage"]:
            stage = records[start]["stage"]
            axis.axvspan(start + 0.5, index + 0.5, color="0.92" if stage % 2 else "white",
                         zorder=0)
            axis.text((start + index + 1) / 2, 0.02, f"stage {stage}", ha="center", va="bottom",
                      fontsize=8, color="0.4", transform=axis.get_xaxis_transform())
            start = index


def per_class_order(per_class: list[Optional[float]]) -> list[int]:
    """The class names in the chart's order: as given, or from the best to the worst top-1
    beyond :data:`SORT_CLASSES_BEYOND` classes (classes without images last)."""
    names = list(per_class)
    if len(names) <= SORT_CLASSES_BEYOND:
        return names
    return sorted(names, key=lambda n: (per_class[n] is None, -(per_class[n] or 0.0)))


def extremes(per_class: dict[str, Optional[float]]) -> tuple[list[str], list[str]]:
    """The best and the worst :data:`EXTREMES` classes by top-1, each from the extreme in
    (classes without images left out), for a chart of more than 2 × EXTREMES classes."""
    measured = [name for name in per_class_order(per_class) if per_class[name] is not None]
    return measured[:EXTREMES], measured[::-1][:EXTREMES]


def plot_per_class(per_class: dict[str, Optional[float]], path: str,
                   title: Optional[str]) -> str:
    """Write a chart of per-class top-1 (a mapping class name → accuracy) to ``path``: a bar
    per class, or beyond 2 × :data:`EXTREMES` classes the best and the worst by name beside
    a histogram of all."""
    if len(per_class) > 2 * EXTREMES:
        return _plot_extremes(per_class, path, title)
    names = per_class_order(per_class)
    if names != list(per_class):
        title += ", sorted by top-1"
    values = [0.0 if per_class[n] is None else per_class[n] for n in names]
    width = max(6, 0.18 * len(names))
    figure = _figure(figsize=(width, 4))
    axis = figure.subplots()
    axis.bar(range(len(names)), values, color="tab:blue")
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=90, fontsize=7 if len(names) > SORT_CLASSES_BEYOND else 9)
    axis.set(ylim=(0, 1), ylabel="top-1")
    axis.set_title(textwrap.fill(title, int(9 * width)), fontsize=10)  # about 9 characters an inch
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    _save(figure, path)
    return path


def _plot_extremes(per_class: dict[str, Optional[float]], path: str, title: str) -> str:
    best, worst = extremes(per_class)
    values = [value for value in per_class.values() if value is not None]
    figure = _figure(figsize=(10, 6))
    bars, histogram = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    # Top to bottom: the best from the best down, a gap, the worst up to the very worst.
    rows = [*best, "", *worst[::-1]]
    for row, name in enumerate(rows):
        if name:
            bars.barh(row, per_class[name], color="tab:blue" if name in best else "tab:red")
    bars.set_yticks(range(len(rows)))
    bars.set_yticklabels(rows, fontsize=8)
    bars.invert_yaxis()
    bars.set(xlim=(0, 1), xlabel="top-1")
    bars.set_title(f"the best and the worst {EXTREMES}", fontsize=10)
    bars.grid(axis="x", alpha=0.3)
    histogram.hist(values, bins=HISTOGRAM_BINS, range=(0, 1), color="tab:gray")
    histogram.set(xlim=(0, 1), xlabel="top-1", ylabel="classes")
    histogram.set_title(f"all {len(values)} classes with images", fontsize=10)
    figure.suptitle(textwrap.fill(title, 90), fontsize=11)
    figure.tight_layout()
    _save(figure, path)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """Regenerate ``curves.png`` of the output folder given on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m utils.reports.plots OUTPUT_DIR", file=sys.stderr)
        return 2
    print(plot_curves(args[0]))
    return 0


if __name__ == "__main__":
    from utils import cli

    cli.run(main)
