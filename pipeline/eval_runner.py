"""The evaluation stage: every metric of every SAE on held-out sequences of an activation store.

    results = run_eval(EvalConfig(saes=["runs/topk", "runs/tsae"], store="<key or path>", out_dir="eval"))

Writes
    <out_dir>/<sae_name>/metrics.json    reconstruction, splice (CE/KL), stability (TSS + controls,
                                         smoothness, MI), lifetimes, temporal reach, faithfulness
    <out_dir>/<sae_name>/features.json   per-latent arrays (firing rate, lifetimes, births/deaths)
    <out_dir>/probes/<task>.json         behaviour, probes (residual and each SAE), faithfulness curves
    <out_dir>/summary.json               headline metrics of every SAE side by side

Evaluation sequences are the store's held-out split (`store.split(val_fraction, split_seed)[1]`, whole
documents; the trainers hold out the same split), first `n_seqs` of it.  Token ids are read from the
store and run through the model: per batch ONE clean forward (which also yields x at the hook) and ONE
zero-ablation forward are shared by all SAEs, then per SAE one encode/decode feeds every streaming
metric and one patched forward gives CE/KL.  Position 0 is excluded everywhere (`skip = 1`) when it
holds BOS (an attention sink whose residual norm dwarfs the rest).  Metric definitions: docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from tsae.host_allocator import retain_freed_blocks

METRICS = ("reconstruction", "splice", "stability", "lifetimes", "reach", "faithfulness", "probes")


@dataclass
class EvalConfig:
    saes: list[str]  # SAE folders (cfg.json + sae_weights.safetensors)
    store: str  # activation store key or path: its held-out sequences are evaluated
    out_dir: str = "eval"
    model: str = "smollm2-135m"
    hook: str | None = None  # default: the SAEs' hook_name (must agree), else the store's single hook
    val_fraction: float = 0.1
    split_seed: int = 0
    n_seqs: int = 64
    batch_size: int = 8
    skip_bos: bool = True
    metrics: tuple[str, ...] = METRICS
    lifetime_max_len: int = 128
    drop_first_run: bool = False
    reach_features: int = 8
    reach_sites: int = 16
    reach_k: int = 8
    probe_tasks: tuple[str, ...] = ()
    probe_n_test: int = 200
    probe_n_train: int = 400
    faithfulness_items: int = 64
    faithfulness_sizes: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    cache_dir: str | None = None
    log: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes copied into every metrics.json


def run_eval(cfg: EvalConfig, *, model=None) -> dict[str, dict]:
    """Run every metric in `cfg.metrics`; returns {sae_name: metrics} (also written to disk)."""
    import torch

    from pipeline.models import load_model
    from pipeline.store import ActivationStore

    unknown = sorted(set(cfg.metrics) - set(METRICS))
    if unknown:
        raise UserError(f"unknown metric group(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    t_start = time.perf_counter()
    saes = _load_saes(cfg.saes)
    model = model or load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, cache_home=cfg.cache_dir)
    device = torch.device(model.device)
    if device.type == "cpu":
        retain_freed_blocks()  # [tokens, d_sae] temporaries reuse heap pages (tsae/host_allocator.py)
    for sae in saes.values():
        sae.to(device).eval()
    hook = _resolve_hook(cfg, saes)
    store = ActivationStore.open(cfg.store, cfg.cache_dir, model=model, hook=hook)
    _check_dims(saes, model, hook, store)
    seq_idx = _eval_sequences(store, cfg)
    _log(cfg, f"eval: {len(saes)} SAE(s) at {hook} on {len(seq_idx)} held-out sequences of {store.key}")

    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        state = _stream(cfg, model, store, hook, saes, seq_idx)
    results = _finish_stream(cfg, state, saes)
    if "reach" in cfg.metrics:
        for name, sae in saes.items():
            results[name]["reach"] = _reach(cfg, model, hook, sae, state["reach_codes"][name],
                                            state["reach_tokens"], state["skip"])
    task_reports = _tasks(cfg, model, hook, saes, state["skip_bos"]) if cfg.probe_tasks else {}
    for name in saes:
        for task, rep in task_reports.items():
            if name in rep.get("faithfulness", {}):
                results[name].setdefault("faithfulness", {})[task] = rep["faithfulness"][name]

    meta = {
        "model": {"name": model.name, "weights_hash": model.weights_hash, "dtype": model.dtype},
        "hook": hook,
        "store": {"key": store.key, "n_seq": store.n_seq, "ctx": store.ctx},
        "eval": {"n_seqs": len(seq_idx), "first_seqs": [int(i) for i in seq_idx[:8]], "skip": state["skip"],
                 "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("saes",)},
    }
    out = Path(cfg.out_dir)
    for name, sae in saes.items():
        res = results[name]
        res["sae"] = {"name": name, "folder": str(cfg.saes[list(saes).index(name)]), "d_sae": sae.cfg.d_sae,
                      "architecture": sae.architecture, "is_temporal": sae.is_temporal}
        res.update(meta)
        res["timing"] = state["timing"]
        features = res.pop("_features", None)
        _write_json(out / name / "metrics.json", res)
        if features is not None:
            _write_json(out / name / "features.json", features)
    for task, rep in task_reports.items():
        _write_json(out / "probes" / f"{task}.json", rep)
    _write_json(out / "summary.json", {"saes": {n: summary(r) for n, r in results.items()}, **meta})
    _log(cfg, f"eval: done in {time.perf_counter() - t_start:.1f} s -> {out}")
    return results


# ---------------------------------------------------------------------------------------- set-up
def _load_saes(folders: list[str]) -> dict:
    from tsae.models.registry import load_sae

    if not folders:
        raise UserError("no SAE folders given")
    saes = {}
    for folder in folders:
        path = Path(folder)
        if not (path / "cfg.json").is_file():
            raise UserError(f"{folder} is not an SAE folder (no cfg.json)")
        name = path.name or "sae"
        while name in saes:
            name += "_"
        try:
            saes[name] = load_sae(path)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            raise UserError(f"cannot load SAE {folder}: {str(err).splitlines()[0]}") from None
    return saes


def _resolve_hook(cfg: EvalConfig, saes: dict) -> str:
    if cfg.hook:
        return cfg.hook
    hooks = {sae.cfg.hook_name for sae in saes.values() if sae.cfg.hook_name}
    if len(hooks) > 1:
        raise UserError(f"the SAEs were trained at different hooks ({', '.join(sorted(hooks))}); evaluate "
                        "them separately or pass hook=")
    if hooks:
        return hooks.pop()
    raise UserError("the SAEs do not record their hook (cfg.hook_name); pass hook=")


def _check_dims(saes: dict, model, hook: str, store) -> None:
    for name, sae in saes.items():
        if sae.cfg.d_in != store.d_model:
            raise UserError(f"SAE {name} has d_in={sae.cfg.d_in} but {hook} has d_model={store.d_model}")


def _eval_sequences(store, cfg: EvalConfig):
    import numpy as np

    if store.n_seq < 2:
        raise UserError(f"store {store.key} holds {store.n_seq} sequence(s); evaluation needs a held-out "
                        "split")
    _, val = store.split(cfg.val_fraction, cfg.split_seed)
    if len(val) == 0:
        raise UserError(f"store {store.key}: the held-out split is empty (val_fraction={cfg.val_fraction})")
    return np.asarray(val[: cfg.n_seqs])


# ---------------------------------------------------------------------------- the streaming pass
def _stream(cfg: EvalConfig, model, store, hook: str, saes: dict, seq_idx) -> dict:
    import numpy as np
    import torch

    from tsae.eval.lifetimes import LifetimeStats
    from tsae.eval.reconstruction import ReconstructionStats
    from tsae.eval.splice import SpliceScorer
    from tsae.eval.stability import StabilityEval

    want = set(cfg.metrics)
    device = torch.device(model.device)
    rows = store.tokens.get_orthogonal_selection((np.sort(seq_idx),))
    tokens_all = torch.from_numpy(np.asarray(rows)).long()
    bos = model.bos_token_id
    skip_bos = bool(cfg.skip_bos and bos is not None and bool((tokens_all[:, 0] == bos).all()))
    skip = 1 if skip_bos else 0
    try:
        mean = torch.as_tensor(store.stats(hook)["mean"], dtype=torch.float32)
    except Exception:  # a store without stats: centre on the first batch instead
        mean = None
    scorer = SpliceScorer(model, hook, skip)
    stats = {
        name: {
            "reconstruction": ReconstructionStats(sae.cfg.d_sae),
            "stability": StabilityEval(sae.cfg.d_sae, input_mean=mean, seed=cfg.seed) if "stability" in want
            else None,
            "lifetimes": LifetimeStats(sae.cfg.d_sae, min(cfg.lifetime_max_len, store.ctx),
                                       drop_first_run=cfg.drop_first_run) if "lifetimes" in want else None,
        }
        for name, sae in saes.items()
    }
    timing = {"tokens": 0, "forward_s": 0.0, "sae_s": 0.0, "patched_s": 0.0, "metrics_s": 0.0}
    reach_batch: dict = {}
    t_pass = time.perf_counter()
    for start in range(0, len(tokens_all), cfg.batch_size):
        tokens = tokens_all[start:start + cfg.batch_size].to(device)
        t0 = time.perf_counter()
        x = scorer.begin(tokens)
        timing["forward_s"] += time.perf_counter() - t0
        timing["tokens"] += tokens.numel()
        for name, sae in saes.items():
            t0 = time.perf_counter()
            xs = x.to(next(sae.parameters()).dtype)
            codes = sae.encode(xs)
            x_hat = sae.decode(codes)
            t1 = time.perf_counter()
            if "splice" in want:
                scorer.score(name, x_hat)
            t2 = time.perf_counter()
            s = stats[name]
            s["reconstruction"].update(xs, x_hat, codes, skip)
            if s["stability"] is not None:
                s["stability"].update(xs, codes, sae.encode, skip)
            if s["lifetimes"] is not None:
                s["lifetimes"].update(codes, skip)
            if start == 0:
                reach_batch[name] = codes.cpu()
            timing["sae_s"] += t1 - t0
            timing["patched_s"] += t2 - t1
            timing["metrics_s"] += time.perf_counter() - t2
        _log(cfg, f"  {min(start + cfg.batch_size, len(tokens_all))}/{len(tokens_all)} sequences")
    timing["pass_s"] = time.perf_counter() - t_pass
    # scorer.begin runs two forwards (clean and zero-ablated): the bare model rate is twice its rate
    timing["bare_forward_tokens_per_s"] = 2 * timing["tokens"] / max(timing["forward_s"], 1e-9)
    timing["eval_tokens_per_s"] = timing["tokens"] / max(timing["pass_s"], 1e-9)
    return {"stats": stats, "scorer": scorer if "splice" in want else None, "skip": skip,
            "skip_bos": skip_bos, "timing": timing, "reach_tokens": tokens_all[:cfg.batch_size],
            "reach_codes": reach_batch}


def _finish_stream(cfg: EvalConfig, state: dict, saes: dict) -> dict[str, dict]:
    splice = state["scorer"].result() if state["scorer"] is not None else {}
    results: dict[str, dict] = {}
    for name in saes:
        s = state["stats"][name]
        res: dict = {"reconstruction": s["reconstruction"].result()}
        if name in splice:
            res["splice"] = splice[name]
        if s["stability"] is not None:
            res["stability"] = s["stability"].result()
        if s["lifetimes"] is not None:
            res["lifetimes"] = s["lifetimes"].result()
            per = s["lifetimes"].per_feature()
            res["_features"] = {k: v.tolist() for k, v in per.items()}
        results[name] = res
    return results


# ------------------------------------------------------------------------------ temporal reach
def _reach(cfg: EvalConfig, model, hook: str, sae, codes, tokens, skip: int) -> dict:
    """Temporal reach of `reach_features` random latents active in the first eval batch (codes, tokens)."""
    import torch

    from tsae.eval.interventions import active_sites, temporal_reach

    k = cfg.reach_k
    T = codes.shape[1]
    usable = (codes[:, skip:max(T - k, skip + 1)] > 0).any(1).any(0)  # active somewhere with room after
    candidates = usable.nonzero().flatten()
    g = torch.Generator().manual_seed(cfg.seed)
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:cfg.reach_features]].tolist()
    profiles = []
    for f in chosen:
        sites = active_sites(codes, f, cfg.reach_sites, skip=skip, k=k, generator=g)
        profiles.append(temporal_reach(model, tokens, hook, sae, f, sites, k=k, skip=skip))
    if not profiles:
        return {"n_features": 0}

    def avg(key: str) -> list[float]:
        return torch.tensor([p[key] for p in profiles], dtype=torch.float64).nanmean(0).tolist()

    return {
        "n_features": len(profiles),
        "k": k,
        "offsets": list(range(k + 1)),
        "kl": avg("kl"),
        "max_abs_dlogit": avg("max_abs_dlogit"),
        "decoder_delta": avg("decoder_delta"),
        "reach_centroid": float(torch.tensor([p["reach_centroid"] for p in profiles]).nanmean()),
        "kl_decay_1": float(torch.tensor([p["kl_decay_1"] for p in profiles]).nanmean()),
        "max_abs_dlogit_before": max(p["max_abs_dlogit_before"] for p in profiles),
        "per_feature": profiles,
    }


# ------------------------------------------------------------------ probing tasks, faithfulness
def _tasks(cfg: EvalConfig, model, hook: str, saes: dict, prepend_bos: bool) -> dict[str, dict]:
    import tsae.eval.probing as probing
    from tsae.eval import faithfulness as fa

    reports: dict[str, dict] = {}
    bos = model.bos_token_id if prepend_bos else None
    skip = 1 if bos is not None else 0
    for task in cfg.probe_tasks:
        try:
            items = probing.make_task(task, model.tokenizer, n_test=cfg.probe_n_test,
                                      n_train=cfg.probe_n_train, seed=cfg.seed)
        except ValueError as err:  # unknown task, or a vocabulary too small for this tokenizer
            raise UserError(f"probing task {task!r}: {str(err).splitlines()[0]}") from None
        test = probing.by_split(items, "test")
        rep: dict = {"task": task, "n_items": len(items), "hook": hook}
        if "probes" in cfg.metrics:
            rep["behaviour"] = probing.behavioural_accuracy(model, test, prepend_bos=prepend_bos)
            feats = probing.collect_features(model, items, hook, saes, batch_size=cfg.batch_size,
                                             prepend_bos=prepend_bos)
            rep["probes"] = probing.probe_report(feats, items, seeds=cfg.seeds)
        if "faithfulness" in cfg.metrics:
            batch = fa.encode_items(model.tokenizer, test[: cfg.faithfulness_items], bos_token_id=bos)
            rep["faithfulness"] = {
                name: fa.faithfulness_curve(model, batch, hook, sae, sizes=cfg.faithfulness_sizes, skip=skip,
                                            batch_size=cfg.batch_size)
                for name, sae in saes.items()
            }
        reports[task] = rep
        _log(cfg, f"  task {task}: done")
    return reports


# -------------------------------------------------------------------------------------- output
HEADLINE = {
    "reconstruction": ("l0", "fvu", "explained_variance", "cos_sim", "frac_dead", "frac_dense"),
    "splice": ("ce_score", "ce_delta", "kl_sae", "kl_score"),
    "stability": ("tss", "tss_shuffled", "tss_shuffled_codes", "tss_kappa", "input_cos_centered"),
    "lifetimes": ("mean_run_length", "median_run_length", "births_per_1k_tokens", "frac_single_token"),
    "reach": ("reach_centroid", "kl_decay_1"),
}


def summary(res: dict) -> dict:
    """The headline numbers of one SAE's metrics.json (flat)."""
    out = {}
    for group, keys in HEADLINE.items():
        for key in keys:
            if key in res.get(group, {}):
                out[f"{group}.{key}"] = res[group][key]
    for task, curve in res.get("faithfulness", {}).items():
        out[f"faithfulness.{task}"] = dict(zip(curve["sizes"], curve["faithfulness"], strict=True))
    return out


def jsonable(obj):
    """Plain JSON types; NaN and infinities become null."""
    import numpy as np
    import torch

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def _log(cfg: EvalConfig, msg: str) -> None:
    if cfg.log:
        print(msg, file=sys.stderr, flush=True)
