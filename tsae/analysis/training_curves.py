"""Training evolution from the trainer's JSONL log: losses, L0, dead fraction, gate openness vs tokens.

A log is one JSON object per line.  Recognised keys (all optional): "tokens" (x axis; else "step",
else the record index), "loss", "mse" and other "*loss*" keys, "l0", "dead_frac", "gate_mean",
"lr", "phase" (1/2/3 for the TSAE schedule) and "event" (a string such as "revive" or
"phase_start").  A panel is drawn only for the keys that have finite numbers; phases are shaded
and labelled, events drawn as dotted vertical lines (one colour and legend entry per event name).
Several runs may be overlaid: pass {run name: records}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import EngFormatter

from tsae.analysis.plotting import model_color, new_figure, save_png, styled

Records = Sequence[Mapping]

PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "mse")),
    ("L0 (active latents / token)", ("l0",)),
    ("dead fraction", ("dead_frac",)),
    ("gate openness (mean)", ("gate_mean",)),
    ("learning rate", ("lr",)),
)
_STYLES = ("-", "--", ":", "-.")


def load_log(path: str | Path) -> list[dict]:
    """Records of a JSONL log; blank and unparsable lines (e.g. a torn last line) are skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _number(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _x(records: Records) -> tuple[str, list[float | None]]:
    for key in ("tokens", "step"):
        if any(_number(r.get(key)) is not None for r in records):
            return key, [_number(r.get(key)) for r in records]
    return "record", [float(i) for i in range(len(records))]


def series(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records with a finite x and a finite number under `key`."""
    _, xs = _x(records)
    pts = [(x, _number(r.get(key))) for x, r in zip(xs, records, strict=True)]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def phase_spans(records: Records) -> list[tuple[int, float, float]]:
    """Contiguous (phase, x_start, x_end) spans in x order."""
    x, ph = series(records, "phase")
    order = np.argsort(x, kind="stable")
    x, ph = x[order], ph[order]
    spans = []
    for i in range(len(x)):
        if not spans or ph[i] != spans[-1][0]:
            spans.append([ph[i], x[i], x[i]])
        spans[-1][2] = x[i + 1] if i + 1 < len(x) else x[i]
    return [(int(p), a, b) for p, a, b in spans]


def _events(records: Records) -> dict[str, list[float]]:
    _, xs = _x(records)
    out: dict[str, list[float]] = {}
    for x, r in zip(xs, records, strict=True):
        if isinstance(r.get("event"), str) and x is not None:
            out.setdefault(r["event"], []).append(x)
    return out


def _panel_keys(runs: Mapping[str, Records]) -> list[tuple[str, list[str]]]:
    present = {k for recs in runs.values() for r in recs for k, v in r.items() if _number(v) is not None}
    extra_losses = sorted(k for k in present if "loss" in k and k not in ("loss", "mse"))
    panels = []
    for title, keys in PANELS:
        keys = [k for k in keys if k in present] + (extra_losses if title == "loss" else [])
        if keys:
            panels.append((title, keys))
    return panels


@styled
def plot_training_curves(logs: Mapping[str, Records] | Records, path: str | Path, *,
                         title: str | None = None) -> Path:
    """Small multiples of the logged curves against tokens, phases shaded, events marked."""
    runs = dict(logs) if isinstance(logs, Mapping) else {"run": list(logs)}
    panels = _panel_keys(runs)
    if not panels:
        raise ValueError("no plottable numeric keys in the training log(s)")
    fig, axes = new_figure(len(panels), 1, figsize=(8.0, 1.9 * len(panels) + 0.6), sharex=True)
    axes = axes[:, 0]
    phased = next((recs for recs in runs.values() if phase_spans(recs)), None)
    events = {name: xs for recs in runs.values() for name, xs in _events(recs).items()}
    for ax, (ptitle, keys) in zip(axes, panels, strict=True):
        for run, recs in runs.items():
            for key, ls in zip(keys, _STYLES * len(keys), strict=False):
                x, y = series(recs, key)
                if len(x):
                    label = key if len(runs) == 1 else f"{run}: {key}"
                    ax.plot(x, y, ls, color=model_color(run) if len(runs) > 1 else None, lw=1.2, label=label)
        ys = [v for line in ax.get_lines() for v in line.get_ydata()]
        if ptitle == "loss" and ys and min(ys) > 0:
            ax.set_yscale("log")
        for p, a, b in phase_spans(phased) if phased else []:
            ax.axvspan(a, b, color=("tab:blue", "tab:orange", "tab:green", "tab:purple")[(p - 1) % 4],
                       alpha=0.08, lw=0)
            if ax is axes[0]:
                ax.text((a + b) / 2, 1.0, f"phase {p}", transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=8)
        for i, (name, xs) in enumerate(sorted(events.items())):
            for j, xv in enumerate(xs):
                ax.axvline(xv, ls=":", lw=0.9, color=f"C{(i + 5) % 10}",
                           label=f"event: {name}" if j == 0 and ax is axes[0] else None)
        ax.set_ylabel(ptitle)
        ax.legend(loc="best", fontsize=7)
    xkey, _ = _x(next(iter(runs.values())))
    axes[-1].set_xlabel(xkey)
    axes[-1].xaxis.set_major_formatter(EngFormatter())
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
