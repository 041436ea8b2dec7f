"""Window-size ablation and cross-model comparison figures (mean ± std over seeds).

Inputs use the plotting format {key: {metric: (mean, std)}}, where a bare number means std 0; a
block of final_info ({metric_mean, metric_std}) is accepted as well and converted.

- `plot_window_ablation`: one small panel per metric, the metric against the TSAE window w
  (log2 axis, error bars = std over seeds).  w = 1 (no memory: the temporal path sees only the
  current token) is the control, drawn as a hollow red marker; optional reference models (e.g. the
  static SAE) are horizontal lines with a ±std band.
- `plot_model_comparison`: one small panel per metric, a bar per model with std error bars (meant
  for models trained to matched L0; say so in the title).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tsae.analysis.aggregate import mean_std
from tsae.analysis.plotting import model_color, new_figure, save_png, styled

Stats = Mapping[str, tuple[float, float] | float]
_ARROW = {"higher": " (↑ better)", "lower": " (↓ better)"}


def as_stats(block: Mapping) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std) | number} or a final_info block -> {metric: (mean, std)}."""
    means = [k for k in block if isinstance(k, str) and k.endswith("_mean")]
    if means and all(isinstance(v, int | float) for v in block.values()) and \
            all(k[: -len("_mean")] + "_std" in block for k in means):
        return mean_std(block)
    out = {}
    for metric, v in block.items():
        mean, std = (v, 0.0) if isinstance(v, int | float) else v
        out[metric] = (float(mean), float(std))
    return out


def _grid(n: int, ncols: int, panel: tuple[float, float]):
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows + 0.5))
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _metrics(blocks: Mapping[object, Mapping[str, tuple]], metrics: Sequence[str] | None) -> list[str]:
    if metrics is not None:
        return list(metrics)
    return list(dict.fromkeys(m for b in blocks.values() for m in b))


@styled
def plot_window_ablation(results: Mapping[int, Mapping], path: str | Path, *,
                         metrics: Sequence[str] | None = None,
                         references: Mapping[str, Mapping] | None = None, control: int = 1,
                         better: Mapping[str, str] | None = None, title: str | None = None,
                         ncols: int = 3) -> Path:
    """Every metric against the window size w (see module doc).  Returns the PNG path."""
    stats = {int(w): as_stats(b) for w, b in sorted(results.items())}
    refs = {name: as_stats(b) for name, b in (references or {}).items()}
    metrics = _metrics(stats, metrics)
    if not metrics:
        raise ValueError("no metrics to plot")
    fig, axes = _grid(len(metrics), ncols, (3.2, 2.5))
    for ax, metric in zip(axes, metrics, strict=True):
        ws = [w for w in stats if metric in stats[w]]
        mean = np.array([stats[w][metric][0] for w in ws])
        std = np.array([stats[w][metric][1] for w in ws])
        ax.errorbar(ws, mean, yerr=std, fmt="-o", ms=4, capsize=3, color=model_color("tsae"), label="TSAE")
        if control in ws:
            i = ws.index(control)
            ax.plot([control], [mean[i]], "o", ms=9, mfc="none", mec="tab:red", mew=1.5,
                    label=f"w={control}: no memory")
        for name, ref in refs.items():
            if metric in ref:
                m, s = ref[metric]
                ax.axhline(m, ls="--", lw=1, color=model_color(name), label=name)
                ax.axhspan(m - s, m + s, color=model_color(name), alpha=0.12, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ws, [str(w) for w in ws])
        ax.minorticks_off()
        ax.set_xlabel("window w (tokens)")
        ax.set_title(metric + _ARROW.get((better or {}).get(metric, ""), ""))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    fig.suptitle(title or "Window-size ablation (mean ± std over seeds)")
    return save_png(fig, path)


@styled
def plot_model_comparison(results: Mapping[str, Mapping], path: str | Path, *,
                          metrics: Sequence[str] | None = None, better: Mapping[str, str] | None = None,
                          title: str | None = None, ncols: int = 3) -> Path:
    """Bar per model and panel per metric, std error bars (see module doc).  Returns the PNG path."""
    stats = {name: as_stats(b) for name, b in results.items()}
    metrics = _metrics(stats, metrics)
    if not metrics:
        raise ValueError("no metrics to plot")
    names = list(stats)
    fig, axes = _grid(len(metrics), ncols, (max(2.6, 0.55 * len(names) + 1.2), 2.6))
    for ax, metric in zip(axes, metrics, strict=True):
        have = [n for n in names if metric in stats[n]]
        mean = [stats[n][metric][0] for n in have]
        std = [stats[n][metric][1] for n in have]
        x = np.array([names.index(n) for n in have])  # fixed slot per model, gaps where missing
        ax.bar(x, mean, yerr=std, capsize=3, color=[model_color(n) for n in have], width=0.7)
        for xi, m, s in zip(x, mean, std, strict=True):
            ax.annotate(f"{m:.3g}", (xi, m + s if m >= 0 else m - s), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(False, axis="x")
        ax.set_title(metric + _ARROW.get((better or {}).get(metric, ""), ""))
    fig.suptitle(title or "Model comparison (mean ± std over seeds)")
    return save_png(fig, path)
