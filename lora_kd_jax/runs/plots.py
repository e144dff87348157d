"""Per-epoch accuracy and loss curves (train and val), and the learning rate and gradient norm, written as PNGs
into the run dir; the study's validation accuracy per run (results.png of `reproduce`).

Every x axis counts whole epochs (integer ticks), the epoch that picked a run's best checkpoint is marked with its
own legend entry, and every line (reference lines included) is named in the legend. The `*_figure(s)` builders
return the figures (tests read their ticks and legends); the `plot_*` functions write them as PNGs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lora_kd_jax.core import selection  # noqa: E402

BEST = {"marker": "*", "markersize": 14, "linestyle": "none", "color": "black", "zorder": 5}  # the best-epoch mark


def plot_curves(history: Sequence[Mapping], run_dir: str | os.PathLike, title: str = "",
                select: str | None = None) -> list[Path]:
    """accuracy.png (a regression: pearson.png) and loss.png of `curve_figures`."""
    return [_write_png(fig, Path(run_dir) / f"{metric}.png")
            for metric, fig in curve_figures(history, title, select).items()]


def curve_figures(history: Sequence[Mapping], title: str = "", select: str | None = None) -> dict[str, Figure]:
    """{score: figure, 'loss': figure} from records like {'epoch', 'train': {...}, 'val': {...}, 'reported': {name:
    {...}}}: train and val, reported sets such as out_of_domain dashed (shown, never used to choose the best epoch),
    and the best epoch by validation `select` (default: the score drawn) marked on the val curve."""
    out = {}
    epochs = [h["epoch"] for h in history]
    select = select or _score(history)
    best = selection.best_entry(history, select) if history else None
    for metric in (_score(history), "loss"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "val"):
            ax.plot(epochs, [h[split][metric] for h in history], marker="o", label=split)
        for name in history[0].get("reported", {}) if history else ():
            ax.plot(epochs, [h["reported"][name][metric] for h in history], marker="o", linestyle="--",
                    label=name.replace("_", "-"))
        if best is not None:
            ax.plot([best["epoch"]], [best["val"][metric]], **BEST, label=f"best epoch {best['epoch']} (val {select})")
        _finish(ax, metric, f"{title} {metric}".strip())
        out[metric] = fig
    return out


def _score(history: Sequence[Mapping]) -> str:
    """The score a run's curves show: accuracy, or pearson for a regression (pearson.png)."""
    return "accuracy" if not history or "accuracy" in history[0]["val"] else "pearson"


def plot_optimizer(histories: Mapping[str, Sequence[Mapping]], run_dir: str | os.PathLike, title: str = ""
                   ) -> Path | None:
    """optimizer.png: per epoch the learning rate of its last step and the mean global gradient norm of the
    trainable leaves (one line per lane: a seeded run draws each seed); None when the history holds neither
    (a run written before they were recorded)."""
    fig = optimizer_figure(histories, title)
    return None if fig is None else _write_png(fig, Path(run_dir) / "optimizer.png")


def optimizer_figure(histories: Mapping[str, Sequence[Mapping]], title: str = "") -> Figure | None:
    """The two panels of optimizer.png (None when no history holds them)."""
    runs = {name: h for name, h in histories.items() if h and "grad_norm" in h[0]["train"]}
    if not runs:
        return None
    fig, (lr_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in runs.items():
        epochs = [h["epoch"] for h in history]
        lr_ax.plot(epochs, [h["train"]["lr"] for h in history], marker="o", label=name)
        norm_ax.plot(epochs, [h["train"]["grad_norm"] for h in history], marker="o", label=name)
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("learning rate (last step)")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.grid(alpha=0.3)
    _finish(norm_ax, "gradient norm (epoch mean)", f"{title} optimizer".strip(), fontsize=9)
    return fig


def _finish(ax, ylabel: str, title: str, fontsize: int | None = None, **legend) -> None:
    """Labels, whole-epoch ticks, grid and legend of one axes."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize and fontsize - 1, **legend)


def _write_png(fig, path: str | os.PathLike) -> Path:
    """Save and close the figure; a file-system error names the PNG (matplotlib's does not always)."""
    path = Path(path)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        plt.close(fig)
    return path


def plot_seed_curves(histories: Mapping[int, Sequence[Mapping]], run_dir: str | os.PathLike,
                     title: str = "") -> list[Path]:
    """accuracy.png (a regression: pearson.png) and loss.png of a seeded run: per split the mean over seeds, a band from the lowest to the highest
    seed, and every seed faintly (reported sets dashed, as in `plot_curves`)."""
    return [_write_png(fig, Path(run_dir) / f"{metric}.png")
            for metric, fig in seed_curve_figures(histories, title).items()]


def seed_curve_figures(histories: Mapping[int, Sequence[Mapping]], title: str = "") -> dict[str, Figure]:
    """The figures of `plot_seed_curves`, by metric."""
    import numpy as np

    out = {}
    runs = list(histories.values())
    epochs = [h["epoch"] for h in runs[0]]
    n = min(len(h) for h in runs)
    splits = [(s, lambda h, s=s: h[s], "-") for s in ("train", "val")]
    splits += [(name, lambda h, name=name: h["reported"][name], "--") for name in runs[0][0].get("reported", {})]
    for metric in (_score(runs[0]), "loss"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, get, style in splits:
            values = np.array([[get(h)[metric] for h in run[:n]] for run in runs])
            (line,) = ax.plot(epochs[:n], values.mean(axis=0), marker="o", linestyle=style,
                              label=f"{split.replace('_', '-')} (mean of {len(runs)})")
            ax.fill_between(epochs[:n], values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            for row in values:
                ax.plot(epochs[:n], row, color=line.get_color(), linestyle=style, linewidth=0.6, alpha=0.35)
        _finish(ax, metric, f"{title} {metric}, seeds {', '.join(map(str, histories))} (band: min–max)", fontsize=9)
        out[metric] = fig
    return out


def plot_val_accuracy(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                      reference: Mapping[str, float] | None = None) -> Path:
    """results.png of reproduce: `val_accuracy_figure`."""
    return _write_png(val_accuracy_figure(runs, reference), path)


def val_accuracy_figure(runs: Mapping[str, Sequence[Mapping]], reference: Mapping[str, float] | None = None
                        ) -> Figure:
    """Validation accuracy per epoch for several runs on one axes, each run's best epoch starred and each
    reference number (the original's) a dotted line named in the legend. A seeded run's history holds stats per
    epoch (seeds.epoch_stats): its mean is drawn with a min–max band (and its best epoch is the best mean)."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    starred = False
    for name, history in runs.items():
        epochs = [h["epoch"] for h in history]
        values = [h["val"]["accuracy"] for h in history]
        if values and isinstance(values[0], Mapping):
            values = [v["mean"] for v in values]
            (line,) = ax.plot(epochs, values, marker="o", label=f"{name} (mean, min–max)")
            ax.fill_between(epochs, [h["val"]["accuracy"]["min"] for h in history],
                            [h["val"]["accuracy"]["max"] for h in history], color=line.get_color(), alpha=0.2)
        else:
            (line,) = ax.plot(epochs, values, marker="o", label=name)
        if values:
            best = max(range(len(values)), key=lambda i: (selection.score({"v": values[i]}, "v"), -i))  # first wins ties
            ax.plot([epochs[best]], [values[best]], **{**BEST, "color": line.get_color(), "markeredgecolor": "black"},
                    label=None if starred else "best epoch (each run)")
            starred = True
        if reference and name in reference:
            ax.axhline(reference[name], color=line.get_color(), linestyle=":", linewidth=1,
                       label=f"{name}: reference {reference[name]:.4f}")
    ax.set_ylabel("val accuracy")
    _finish(ax, "val accuracy", "validation accuracy per epoch", fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0))
    return fig
