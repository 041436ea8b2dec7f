"""Seeds -> mean and std per model and metric -> `final_info.json`, plus its validator and tables.

Schema of final_info.json, keyed by dataset name:

    {"shakespeare": {"tsae": {"fvu_mean": 0.12, "fvu_std": 0.004, "l0_mean": 32.0, "l0_std": 0.0, ...},
                     "topk": {...}}}

i.e. {dataset: {model: {"<metric>_mean": float, "<metric>_std": float}}}: every metric of a model
appears exactly as one _mean / _std pair, over the run's seeds.  std is the sample standard
deviation (ddof = 1), 0.0 when there is a single seed.  Every value is a finite number (the file is
written with allow_nan=False).  Models may carry different metrics (e.g. gate statistics only for
the TSAE); within a model every seed must report the same metrics.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PerSeed = Mapping[str, Mapping[str, float]]  # {model: {metric: value}} from one seed


class FinalInfoError(ValueError):
    """final_info does not follow the schema; the message lists every problem found."""


def aggregate_seeds(per_seed: Sequence[PerSeed]) -> dict[str, dict[str, float]]:
    """[{model: {metric: value}} per seed] -> {model: {metric_mean, metric_std}}.  NaN propagates."""
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    models = list(per_seed[0])
    out: dict[str, dict[str, float]] = {}
    for model in models:
        metrics = list(per_seed[0][model])
        for i, seed in enumerate(per_seed):
            got = set(seed.get(model, {}))
            if got != set(metrics):
                raise ValueError(f"seed {i}, model {model!r}: metrics {sorted(got ^ set(metrics))} "
                                 "are not reported by every seed")
        out[model] = {}
        for metric in metrics:
            vals = np.array([float(seed[model][metric]) for seed in per_seed])
            out[model][f"{metric}_mean"] = float(vals.mean())
            spread = len(vals) > 1 and vals.max() > vals.min()  # identical values: exactly 0
            out[model][f"{metric}_std"] = float(vals.std(ddof=1)) if spread else 0.0
    extra = {m for seed in per_seed for m in seed} - set(models)
    if extra:
        raise ValueError(f"models {sorted(extra)} are missing from seed 0")
    return out


def build_final_info(results: Mapping[str, Sequence[PerSeed]]) -> dict:
    """{dataset: [per-seed {model: {metric: value}}]} -> validated final_info dict."""
    info = {dataset: aggregate_seeds(seeds) for dataset, seeds in results.items()}
    validate_final_info(info)
    return info


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _model_problems(where: str, block) -> list[str]:
    if not isinstance(block, Mapping) or not block:
        return [f"{where}: expected a non-empty dict of <metric>_mean/_std"]
    problems = []
    for key, v in block.items():
        if not (isinstance(key, str) and (key.endswith("_mean") or key.endswith("_std"))):
            problems.append(f"{where}: key {key!r} is neither <metric>_mean nor <metric>_std")
            continue
        base, kind = key.rsplit("_", 1)
        partner = f"{base}_std" if kind == "mean" else f"{base}_mean"
        if partner not in block:
            problems.append(f"{where}: {key!r} has no matching {partner!r}")
        if not _is_number(v) or not math.isfinite(v):
            problems.append(f"{where}.{key}: not a finite number ({v!r})")
        elif kind == "std" and v < 0:
            problems.append(f"{where}.{key}: negative std ({v!r})")
    return problems


def validate_final_info(info) -> None:
    """Raise FinalInfoError listing every violation of the schema (see module doc)."""
    problems: list[str] = []
    if not isinstance(info, Mapping) or not info:
        raise FinalInfoError("final_info must be a non-empty dict keyed by dataset name")
    for dataset, models in info.items():
        if not isinstance(dataset, str) or not dataset:
            problems.append(f"dataset key {dataset!r} is not a non-empty string")
        if not isinstance(models, Mapping) or not models:
            problems.append(f"{dataset}: expected a non-empty dict keyed by model name")
            continue
        for model, block in models.items():
            problems += _model_problems(f"{dataset}.{model}", block)
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
        raise FinalInfoError(shown)


def write_final_info(path: str | Path, info: Mapping) -> Path:
    validate_final_info(info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
    return path


def load_final_info(path: str | Path) -> dict:
    info = json.loads(Path(path).read_text())
    validate_final_info(info)
    return info


def mean_std(block: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """{"fvu_mean": m, "fvu_std": s, ...} -> {"fvu": (m, s), ...} (the plotting format)."""
    return {key[: -len("_mean")]: (float(v), float(block.get(key[: -len("_mean")] + "_std", 0.0)))
            for key, v in block.items() if key.endswith("_mean")}


def metric_names(models: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Union of the metrics of all models, in first-seen order."""
    seen: dict[str, None] = {}
    for block in models.values():
        seen.update(dict.fromkeys(mean_std(block)))
    return list(seen)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}g} ± {std:.2g}"


def comparison_table(models: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None, *,
                     fmt: str = "markdown", digits: int = 3, better: Mapping[str, str] | None = None) -> str:
    """A metrics x models table of "mean ± std" for one dataset's block of final_info.

    `better[metric]` in {"higher", "lower"} bolds the best model's cell in that row.
    """
    if fmt not in ("markdown", "html"):
        raise ValueError(f"fmt must be 'markdown' or 'html', got {fmt!r}")
    stats = {model: mean_std(block) for model, block in models.items()}
    metrics = list(metrics) if metrics is not None else metric_names(models)
    names = list(stats)
    rows = []
    for metric in metrics:
        vals = {m: stats[m][metric] for m in names if metric in stats[m]}
        best = None
        if better and better.get(metric) in ("higher", "lower") and vals:
            pick = max if better[metric] == "higher" else min
            best = pick(vals, key=lambda m: vals[m][0])
        cells = []
        for m in names:
            text = format_mean_std(*vals[m], digits) if m in vals else "–"
            if m == best:
                text = f"**{text}**" if fmt == "markdown" else f"<b>{html.escape(text)}</b>"
            elif fmt == "html":
                text = html.escape(text)
            cells.append(text)
        arrow = {"higher": " ↑", "lower": " ↓"}.get((better or {}).get(metric, ""), "")
        rows.append((metric + arrow, cells))
    if fmt == "markdown":
        lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {metric} | " + " | ".join(cells) + " |" for metric, cells in rows]
        return "\n".join(lines) + "\n"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><th>{html.escape(metric)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                   for metric, cells in rows)
    return f'<table class="cmp"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>\n'
