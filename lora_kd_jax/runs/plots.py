"""Per-epoch accuracy and loss curves (train and val), and the learning rate and gradient norm, written as PNGs
into the run dir."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: Sequence[Mapping], run_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """accuracy.png and loss.png from records like {'epoch', 'train': {...}, 'val': {...}, 'reported': {name: {...}}}
    (reported sets such as out_of_domain are drawn dashed: they are shown, not used to choose the best epoch)."""
    out = []
    epochs = [h["epoch"] for h in history]
    for metric, ylabel in ((_score(history), _score(history)), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "val"):
            ax.plot(epochs, [h[split][metric] for h in history], marker="o", label=split)
        for name in history[0].get("reported", {}) if history else ():
            ax.plot(epochs, [h["reported"][name][metric] for h in history], marker="o", linestyle="--",
                    label=name.replace("_", "-"))
        out.append(_save(fig, ax, ylabel, f"{title} {metric}".strip(), Path(run_dir) / f"{metric}.png"))
    return out


def _score(history: Sequence[Mapping]) -> str:
    """The score a run's curves show: accuracy, or pearson for a regression (pearson.png)."""
    return "accuracy" if not history or "accuracy" in history[0]["val"] else "pearson"


def plot_optimizer(histories: Mapping[str, Sequence[Mapping]], run_dir: str | os.PathLike, title: str = ""
                   ) -> Path | None:
    """optimizer.png: per epoch the learning rate of its last step and the mean global gradient norm of the
    trainable leaves (one line per lane: a seeded run draws each seed); None when the history holds neither
    (a run written before they were recorded)."""
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
    lr_ax.grid(alpha=0.3)
    return _save(fig, norm_ax, "gradient norm (epoch mean)", f"{title} optimizer".strip(),
                 Path(run_dir) / "optimizer.png", fontsize=9)


def _save(fig, ax, ylabel: str, title: str, path: Path, fontsize: int | None = None) -> Path:
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=fontsize and fontsize - 1)
    return _write_png(fig, path)


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
    import numpy as np

    out = []
    runs = list(histories.values())
    epochs = [h["epoch"] for h in runs[0]]
    n = min(len(h) for h in runs)
    splits = [(s, lambda h, s=s: h[s], "-") for s in ("train", "val")]
    splits += [(name, lambda h, name=name: h["reported"][name], "--") for name in runs[0][0].get("reported", {})]
    for metric, ylabel in ((_score(runs[0]), _score(runs[0])), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, get, style in splits:
            values = np.array([[get(h)[metric] for h in run[:n]] for run in runs])
            (line,) = ax.plot(epochs[:n], values.mean(axis=0), marker="o", linestyle=style,
                              label=f"{split.replace('_', '-')} (mean of {len(runs)})")
            ax.fill_between(epochs[:n], values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            for row in values:
                ax.plot(epochs[:n], row, color=line.get_color(), linestyle=style, linewidth=0.6, alpha=0.35)
        out.append(_save(fig, ax, ylabel, f"{title} {metric}, seeds {', '.join(map(str, histories))} (band: min–max)",
                         Path(run_dir) / f"{metric}.png", fontsize=9))
    return out


def plot_val_accuracy(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                      reference: Mapping[str, float] | None = None) -> Path:
    """Validation accuracy per epoch for several runs on one axes (results.png of reproduce). A seeded run's history
    holds stats per epoch (seeds.epoch_stats): its mean is drawn with a min–max band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, history in runs.items():
        epochs = [h["epoch"] for h in history]
        values = [h["val"]["accuracy"] for h in history]
        if values and isinstance(values[0], Mapping):
            (line,) = ax.plot(epochs, [v["mean"] for v in values], marker="o", label=f"{name} (mean, min–max)")
            ax.fill_between(epochs, [v["min"] for v in values], [v["max"] for v in values], color=line.get_color(),
                            alpha=0.2)
        else:
            (line,) = ax.plot(epochs, values, marker="o", label=name)
        if reference and name in reference:
            ax.axhline(reference[name], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _write_png(fig, path)
