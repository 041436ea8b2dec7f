"""Feature evolution along one passage: which features carry the text, and when they live and die.

Both figures take `panels = {model name: codes [T, F]}` (one passage, codes >= 0, active = code > 0)
and the passage's decoded tokens, and draw one panel per model stacked vertically on a shared token
axis, so the same position lines up across models (e.g. a static SAE above the TSAE).  Features of
different models are unrelated; each panel picks its own.

- `plot_feature_heatmap`: the `top` features by total activation in the passage, rows ordered by
  first activation (the text's evolution reads as a staircase), colour = activation divided by that
  feature's maximum in the passage (or raw with normalize=False); inactive cells blank.
- `plot_lifecycle`: the same features as a raster of runs (maximal intervals of activity) drawn
  as horizontal bars; a birth (onset, green >) is marked on the left edge of a run that starts after
  position 0, a death (red x) on the right edge of a run that ends before the last position.  Runs
  touching either edge are censored, not marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tsae.analysis.plotting import model_color, new_figure, save_png, styled, tex_safe


def _codes(codes) -> np.ndarray:
    arr = np.asarray(codes.detach().cpu() if hasattr(codes, "detach") else codes, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected codes [T, F] for one passage, got shape {arr.shape}")
    return arr


def top_features(codes: np.ndarray, top: int) -> np.ndarray:
    """The `top` features by total activation (active ones only), ordered by first active position."""
    total = codes.sum(axis=0)
    chosen = np.argsort(-total, kind="stable")[:top]
    chosen = chosen[total[chosen] > 0]
    first = (codes[:, chosen] > 0).argmax(axis=0)
    return chosen[np.lexsort((chosen, first))]


def run_intervals(active: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of a 1-d bool array as (start, end) with end exclusive."""
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _prepare(panels: Mapping[str, object], tokens: Sequence[str]) -> dict[str, np.ndarray]:
    if not panels:
        raise ValueError("need at least one panel {model: codes [T, F]}")
    out = {name: _codes(c) for name, c in panels.items()}
    for name, c in out.items():
        if c.shape[0] != len(tokens):
            raise ValueError(f"{name}: codes have T={c.shape[0]} positions but {len(tokens)} tokens given")
    return out


def _token_axis(ax, tokens: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(tokens)))
    ax.set_xticklabels([tex_safe(t) for t in tokens], rotation=90, fontsize=7, family="monospace")
    ax.set_xlim(-0.5, len(tokens) - 0.5)


def _feature_axis(ax, feats: np.ndarray, labels: Mapping[int, str] | None) -> None:
    ax.set_yticks(np.arange(len(feats)))
    names = [f"f{f}" + (f" {tex_safe(labels[f], 18)}" if labels and f in labels else "") for f in feats]
    ax.set_yticklabels(names, fontsize=7)
    ax.set_ylim(len(feats) - 0.5, -0.5)
    ax.grid(False)


def _figure(panels: dict[str, np.ndarray], tokens: Sequence[str], top: int):
    feats = {name: top_features(c, top) for name, c in panels.items()}
    heights = [max(len(f), 1) for f in feats.values()]
    width = min(max(6.0, 0.2 * len(tokens) + 2.5), 40.0)
    fig, axes = new_figure(len(panels), 1, figsize=(width, 0.2 * sum(heights) + 1.3 * len(panels) + 0.6),
                           sharex=True, gridspec_kw={"height_ratios": heights})
    return fig, axes[:, 0], feats


@styled
def plot_feature_heatmap(panels: Mapping[str, object], tokens: Sequence[str], path: str | Path, *,
                         top: int = 16, normalize: bool = True, title: str | None = None,
                         feature_labels: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Position-by-feature heatmap per model (see module doc).  Returns the PNG path."""
    panels = _prepare(panels, tokens)
    fig, axes, feats = _figure(panels, tokens, top)
    for ax, (name, codes) in zip(axes, panels.items(), strict=True):
        f = feats[name]
        vals = codes[:, f].T  # [n_feat, T]
        if normalize and len(f):
            vals = vals / vals.max(axis=1, keepdims=True)
        image = ax.imshow(np.ma.masked_less_equal(vals, 0), aspect="auto", interpolation="nearest",
                          vmin=0, vmax=1 if normalize else None)
        _feature_axis(ax, f, (feature_labels or {}).get(name))
        ax.set_title(f"{name}: top {len(f)} features by total activation", loc="left")
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01,
                     label="activation / feature max" if normalize else "activation")
    _token_axis(axes[-1], tokens)
    if title:
        fig.suptitle(tex_safe(title, 120))
    return save_png(fig, path)


@styled
def plot_lifecycle(panels: Mapping[str, object], tokens: Sequence[str], path: str | Path, *, top: int = 24,
                   title: str | None = None,
                   feature_labels: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Raster of feature runs with births and deaths per model (see module doc).  Returns the PNG path."""
    panels = _prepare(panels, tokens)
    T = len(tokens)
    fig, axes, feats = _figure(panels, tokens, top)
    for ax, (name, codes) in zip(axes, panels.items(), strict=True):
        f = feats[name]
        lengths, born, died = [], [], []
        for row, feat in enumerate(f):
            spans = run_intervals(codes[:, feat] > 0)
            ax.broken_barh([(s - 0.45, e - s - 0.1) for s, e in spans], (row - 0.3, 0.6),
                           facecolors=model_color(name))
            lengths += [e - s for s, e in spans]
            born += [(s - 0.5, row) for s, _ in spans if s > 0]
            died += [(e - 0.5, row) for _, e in spans if e < T]
        for pts, marker, color, label in ((born, ">", "tab:green", "birth"), (died, "x", "tab:red", "death")):
            if pts:
                x, y = zip(*pts, strict=True)
                ax.scatter(x, y, marker=marker, color=color, s=18, zorder=3, label=label)
        _feature_axis(ax, f, (feature_labels or {}).get(name))
        mean_len = f"{np.mean(lengths):.2f}" if lengths else "n/a"
        ax.set_title(f"{name}: {len(f)} features, {len(lengths)} runs, mean run length {mean_len} tokens",
                     loc="left")
        ax.grid(True, axis="x", alpha=0.2)
        if born or died:
            ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2)
    _token_axis(axes[-1], tokens)
    if title:
        fig.suptitle(tex_safe(title, 120))
    return save_png(fig, path)
