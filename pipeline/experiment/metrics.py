"""From the evaluation's per-SAE metrics.json to the flat headline metrics of final_info.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

# final_info metric name -> (metrics.json group, key)
HEADLINE = {
    "fvu": ("reconstruction", "fvu"),
    "l0": ("reconstruction", "l0"),
    "frac_dead": ("reconstruction", "frac_dead"),
    "ce_score": ("splice", "ce_score"),
    "ce_delta": ("splice", "ce_delta"),
    "kl": ("splice", "kl_sae"),
    "kl_score": ("splice", "kl_score"),
    "tss": ("stability", "tss"),
    "tss_shuffled": ("stability", "tss_shuffled"),
    "tss_shuffled_codes": ("stability", "tss_shuffled_codes"),
    "tss_kappa": ("stability", "tss_kappa"),
    "mean_lifetime": ("lifetimes", "mean_run_length"),
    "frac_single_token": ("lifetimes", "frac_single_token"),
    "births_per_1k_tokens": ("lifetimes", "births_per_1k_tokens"),
    "reach_centroid": ("reach", "reach_centroid"),
}
FAITHFULNESS_AT = 20  # features kept when a faithfulness curve is summarised by one number


def headline(metrics: dict, name: str, probes: dict[str, dict]) -> dict[str, float]:
    """Flat {metric: value} for one SAE; `probes` is {task: the task's JSON}."""
    out: dict[str, float] = {}
    for metric, (group, key) in HEADLINE.items():
        v = metrics.get(group, {}).get(key)
        if isinstance(v, int | float):
            out[metric] = float(v)
    for task, rep in probes.items():
        src = rep.get("probes", {}).get("sources", {}).get(name)
        if src:
            out[f"probe_{task}"] = float(src["dense"]["mean"])
            sparse = src.get("sparse", {})
            k5 = sparse.get("5", sparse.get(5))
            if k5:
                out[f"probe_{task}_k5"] = float(k5["mean"])
        curve = rep.get("faithfulness", {}).get(name)
        if curve:
            kept = _faithfulness_at(curve, FAITHFULNESS_AT)
            if kept is not None:
                out[f"faithfulness_{task}"] = kept
    return out


def _faithfulness_at(curve: dict, n: int) -> float | None:
    sizes = curve.get("sizes", [])
    values = curve.get("faithfulness", [])
    pairs = [(s, v) for s, v in zip(sizes, values, strict=False) if v is not None]
    if not pairs:
        return None
    best = min(pairs, key=lambda p: abs(p[0] - n))
    return float(best[1])


def residual_probes(probes: dict[str, dict]) -> dict[str, float]:
    out = {}
    for task, rep in probes.items():
        src = rep.get("probes", {}).get("sources", {}).get("residual")
        if src:
            out[f"probe_{task}"] = float(src["dense"]["mean"])
    return out


def read_probes(eval_dir: Path) -> dict[str, dict]:
    folder = eval_dir / "probes"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def common_finite(per_seed: list[dict[str, dict[str, float]]]) -> tuple[list[dict], list[str]]:
    """Keep, per model, only metrics that every seed reports as a finite number; name what was dropped."""
    dropped = []
    models = per_seed[0].keys()
    cleaned = [dict() for _ in per_seed]
    for model in models:
        keys = set.intersection(*(set(s.get(model, {})) for s in per_seed))
        for key in sorted(set().union(*(s.get(model, {}) for s in per_seed))):
            ok = key in keys and all(math.isfinite(s[model][key]) for s in per_seed)
            if not ok:
                dropped.append(f"{model}.{key}")
                continue
            for c, s in zip(cleaned, per_seed, strict=True):
                c.setdefault(model, {})[key] = s[model][key]
    return cleaned, dropped
