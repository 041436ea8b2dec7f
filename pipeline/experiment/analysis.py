"""The experiment's analysis: feature evolution, training curves, transition mining, ablation plots.

Everything here reads codes of held-out cached sequences (no model forward): the store already holds
their residuals, so an SAE's codes are one encode away.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tsae.analysis.ablation_plots import plot_model_comparison, plot_window_ablation
from tsae.analysis.evolution import plot_feature_heatmap, plot_lifecycle
from tsae.analysis.training_curves import load_log, plot_training_curves
from tsae.analysis.transition_graph import plot_transition_graph
from tsae.analysis.transitions import example_contexts, mine_transitions


def heldout_codes(store, hook: str, seq_idx: np.ndarray, saes: dict, skip: int, batch: int = 16):
    """Codes of every SAE on the held-out sequences: {name: float32 [n, ctx - skip, d_sae]}, tokens."""
    acts, tokens = store.read(np.sort(seq_idx), hook)
    out = {}
    with torch.inference_mode():
        for name, sae in saes.items():
            parts = [sae.encode(torch.from_numpy(acts[i:i + batch]).float())[:, skip:].numpy()
                     for i in range(0, len(acts), batch)]
            out[name] = np.concatenate(parts)
    return out, tokens[:, skip:]


def decode_tokens(tokenizer, tokens: np.ndarray) -> list[list[str]]:
    return [[tokenizer.decode([int(t)]) for t in row] for row in tokens]


def feature_evolution(codes: dict[str, np.ndarray], words: list[list[str]], fig_dir: Path, passages: int,
                      length: int) -> list[tuple[Path, str]]:
    figs = []
    for p in range(min(passages, len(words))):
        panels = {name: c[p, :length] for name, c in codes.items()}
        toks = words[p][:length]
        heat = plot_feature_heatmap(panels, toks, fig_dir / f"evolution_heatmap_{p}.png",
                                    title=f"Held-out passage {p}: top features by position")
        life = plot_lifecycle(panels, toks, fig_dir / f"lifecycle_timeline_{p}.png")
        figs += [(Path(heat), f"Passage {p}: position-by-feature heatmap of the top features, static TopK "
                  "against TSAE (seed 0), tokens on the axis."),
                 (Path(life), f"Passage {p}: lifecycle timeline; each bar is one run of a feature "
                  "(birth to death).")]
    return figs


def training_evolution(logs: dict[str, Path], fig_dir: Path) -> tuple[Path, str]:
    records = {name: load_log(path) for name, path in logs.items() if path.is_file()}
    path = plot_training_curves(records, fig_dir / "training_evolution.png",
                                title="Training: losses, L0, dead fraction, gate openness")
    return Path(path), ("Training evolution (seed 0): loss terms, L0, dead fraction and gate openness "
                        "against tokens; the TSAE's three phases are shaded.")


def transitions(codes: dict[str, np.ndarray], words: list[list[str]], fig_dir: Path, cfg: dict) -> dict:
    """Mine A-then-B transitions per model; returns {name: {"n_significant", "top": [...], "figure"}}."""
    out = {}
    events = cfg.get("transition_events", "onset")
    for name, c in codes.items():
        active = c > 0
        stats = mine_transitions(active, lags=tuple(cfg.get("transition_lags", (1, 2, 3, 4))),
                                 top_n=int(cfg.get("transition_top_n", 256)),
                                 events=events)
        top = stats.top(n=len(stats.features) ** 2 * len(stats.lags))  # every significant A != B pair
        listed = []
        for tr in top[:10]:
            d = tr.as_dict()
            found = example_contexts(active, words, tr.A, tr.B, tr.k, n=2, events=events)
            d["examples"] = [e["text"] for e in found]
            listed.append(d)
        fig = fig_dir / f"transition_graph_{name}.png" if top else None
        if fig:
            plot_transition_graph(top[:30], fig, layout="spring")
        out[name] = {"n_significant": len(top), "n_features_mined": len(stats.features), "top": listed,
                     "figure": fig}
    return out


def comparison_figure(block: dict, fig_dir: Path, metrics: list[str], name: str, title: str) -> Path:
    sub = {m: {k: v for k, v in stats.items() if k.rsplit("_", 1)[0] in metrics}
           for m, stats in block.items()}
    return Path(plot_model_comparison(sub, fig_dir / f"{name}.png", title=title,
                                      better={"fvu": "lower", "ce_delta": "lower", "kl": "lower"}))


def window_figure(block: dict, windows: dict[str, int], fig_dir: Path, metrics: list[str]) -> Path | None:
    rows = {w: {k: v for k, v in block[name].items() if k.rsplit("_", 1)[0] in metrics}
            for name, w in windows.items() if name in block}
    if len(rows) < 2:
        return None
    return Path(plot_window_ablation(rows, fig_dir / "window_ablation.png",
                                     better={"fvu": "lower", "ce_delta": "lower", "kl": "lower"}))
