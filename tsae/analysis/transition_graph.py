"""The top feature transitions drawn as a directed graph (matplotlib only).

Nodes are features; an edge A -> B is a significant transition "B follows A k tokens later"
(from `transitions.TransitionStats.top`), its width growing with log(lift), its colour and label
giving the lag k.  Several lags between the same pair are drawn as separate arcs.

Layouts are computed here: `circular_layout` (nodes evenly on the unit circle, grouped by connected
component so that edges stay short) and `spring_layout` (Fruchterman-Reingold: repulsion k^2/d
between all nodes, attraction w d^2/k along edges with w = log lift / max, a cooling step size, nodes
confined to the frame [-1, 1]^2; k = sqrt(4/n)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from tsae.analysis.plotting import new_figure, save_png, styled, tex_safe
from tsae.analysis.transitions import Transition

_LAG_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def circular_layout(n: int) -> np.ndarray:
    angle = np.pi / 2 - 2 * np.pi * np.arange(n) / max(n, 1)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def spring_layout(n: int, edges: Sequence[tuple[int, int, float]], *, iters: int = 300,
                  seed: int = 0) -> np.ndarray:
    """Fruchterman-Reingold positions [n, 2] in the frame [-1, 1]^2 for weighted edges (i, j, weight)."""
    if n < 2:
        return np.zeros((n, 2))
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-1, 1, size=(n, 2))
    k = math.sqrt(4.0 / n)  # ideal edge length: the frame's area shared among the nodes
    adj = np.zeros((n, n))
    for i, j, w in edges:
        adj[i, j] = adj[j, i] = max(adj[i, j], w)
    adj /= max(adj.max(), 1e-12)  # attraction weights in (0, 1]
    step = 0.2
    for _ in range(iters):
        delta = pos[:, None, :] - pos[None, :, :]  # [n, n, 2], from j to i
        dist = np.linalg.norm(delta, axis=-1).clip(min=1e-3)
        force = (k * k / dist**2 - adj * dist / k)[..., None] * delta  # repulsion - attraction
        disp = force.sum(axis=1)
        length = np.linalg.norm(disp, axis=1, keepdims=True).clip(min=1e-9)
        pos = np.clip(pos + disp / length * np.minimum(length, step), -1, 1)  # confined to the frame
        step = max(step * 0.985, 0.002)
    pos -= (pos.max(axis=0) + pos.min(axis=0)) / 2
    return pos / max(np.abs(pos).max(), 1e-12)


def component_order(n: int, edges: Sequence[tuple[int, int]]) -> list[int]:
    """Nodes grouped by connected component (largest first, breadth-first inside), for circular layouts."""
    nbrs: list[set[int]] = [set() for _ in range(n)]
    for i, j in edges:
        nbrs[i].add(j)
        nbrs[j].add(i)
    seen: set[int] = set()
    comps = []
    for start in range(n):
        if start in seen:
            continue
        comp, queue = [], [start]
        seen.add(start)
        while queue:
            node = queue.pop(0)
            comp.append(node)
            for m in sorted(nbrs[node] - seen):
                seen.add(m)
                queue.append(m)
        comps.append(comp)
    return [node for comp in sorted(comps, key=len, reverse=True) for node in comp]


def _as_transition(t: Transition | Mapping) -> Transition:
    if isinstance(t, Transition):
        return t
    return Transition(**{f: t[f] for f in Transition.__dataclass_fields__})


@styled
def plot_transition_graph(transitions: Sequence[Transition | Mapping], path: str | Path, *,
                          labels: Mapping[int, str] | None = None, layout: str = "circular",
                          max_edges: int = 30, seed: int = 0, title: str | None = None) -> Path:
    """Directed graph of the top `max_edges` transitions (highest lift first).  Returns the PNG path.

    `labels[feature]` is an optional short description printed under the node (e.g. its top token).
    """
    edges = sorted((_as_transition(t) for t in transitions), key=lambda t: -t.lift)
    edges = [t for t in edges if t.A != t.B][:max_edges]
    if not edges:
        raise ValueError("no transitions to draw")
    nodes = list(dict.fromkeys(f for t in edges for f in (t.A, t.B)))
    index = {f: i for i, f in enumerate(nodes)}
    if layout == "circular":
        nodes = [nodes[i] for i in component_order(len(nodes), [(index[t.A], index[t.B]) for t in edges])]
        index = {f: i for i, f in enumerate(nodes)}
    log_lift = np.log([max(t.lift, 1.0 + 1e-9) for t in edges])
    if layout == "circular":
        pos = circular_layout(len(nodes))
    elif layout == "spring":
        weighted = [(index[t.A], index[t.B], w) for t, w in zip(edges, log_lift, strict=True)]
        pos = spring_layout(len(nodes), weighted, seed=seed)
    else:
        raise ValueError(f"layout must be 'circular' or 'spring', got {layout!r}")

    fig, axes = new_figure(figsize=(7.5, 7.5))
    ax = axes[0, 0]
    lo, hi = log_lift.min(), log_lift.max()
    widths = 0.8 + 4.0 * (log_lift - lo) / (hi - lo if hi > lo else 1.0)
    lags = sorted({t.k for t in edges})
    seen: dict[tuple[int, int], int] = {}
    for t, lw in zip(edges, widths, strict=True):
        p0, p1 = pos[index[t.A]], pos[index[t.B]]
        rad = 0.12 + 0.12 * seen.get((t.A, t.B), 0)
        seen[(t.A, t.B)] = seen.get((t.A, t.B), 0) + 1
        color = _LAG_COLORS[lags.index(t.k) % len(_LAG_COLORS)]
        ax.add_patch(FancyArrowPatch(p0, p1, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=10 + 2 * lw, lw=lw, color=color, alpha=0.75,
                                     shrinkA=13, shrinkB=13, zorder=1))
        d = p1 - p0
        mid = (p0 + p1) / 2 + 0.5 * rad * np.array([d[1], -d[0]])  # midpoint of the arc3 Bezier
        ax.text(*mid, str(t.k), fontsize=7, ha="center", va="center", color=color, zorder=3,
                bbox={"boxstyle": "circle,pad=0.15", "fc": "white", "ec": color, "lw": 0.6})
    ax.scatter(pos[:, 0], pos[:, 1], s=520, c="white", edgecolors="0.2", linewidths=1.2, zorder=2)
    for f, (x, y) in zip(nodes, pos, strict=True):
        ax.text(x, y, f"f{f}", fontsize=7, ha="center", va="center", zorder=4)
        if labels and f in labels:  # outside the circle (circular) or under the node (spring)
            lx, ly = (x * 1.2, y * 1.2) if layout == "circular" else (x, y - 0.1)
            ax.text(lx, ly, tex_safe(labels[f], 20), fontsize=7, ha="center", va="center", zorder=4,
                    color="0.25", family="monospace")
    ax.legend([Line2D([], [], color=_LAG_COLORS[i % len(_LAG_COLORS)], lw=2) for i in range(len(lags))],
              [f"lag k={k}" for k in lags], loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_aspect("equal")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.axis("off")
    lifts = [t.lift for t in edges]
    ax.set_title(title or f"Top {len(edges)} transitions A → B (edge width ∝ log lift, "
                          f"lift {min(lifts):.2g}–{max(lifts):.2g})")
    return save_png(fig, path)
