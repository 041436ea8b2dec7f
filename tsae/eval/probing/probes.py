"""Linear probes on the residual stream and on SAE codes at each item's decision point.

Features.  One model forward per batch gives the residual x [B, T, d] at `hook` over the whole
prefix; every SAE encodes that whole sequence (SAEs are causal and temporal ones need the history),
f = SAE.encode(x) [B, T, d_sae]; the row kept for item b is position last[b], the prefix's last token.

Dense probe.  Standardise, then L2 logistic regression with C chosen by stratified K-fold CV on the
train split; report accuracy on the test split (disjoint vocabulary, see items.py).

Sparse probe (SAEBench-style).  On the train split rank features by |mean(X | y=1) - mean(X | y=0)|,
keep the top k (k = 1, 5, 20), fit a logistic regression on those alone, report test accuracy.

Seeds.  Each seed draws a balanced subsample of the train split (80%, at most `max_train` items) and
its own CV folds; a report gives mean, std and a t-interval over seeds.  Test items never change.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from tsae.eval.probing.behaviour import bos_id
from tsae.eval.probing.items import ProbeItem, prefix_batches

CS = (1e-3, 1e-2, 1e-1, 1.0)
KS = (1, 5, 20)
RESIDUAL = "residual"


@torch.no_grad()
def collect_features(
    model,
    items: Sequence[ProbeItem],
    hook: str,
    saes: Mapping | None = None,
    batch_size: int = 32,
    prepend_bos: bool = True,
) -> dict[str, np.ndarray]:
    """{"residual": [n, d], <sae name>: [n, d_sae]} at each item's decision point, in item order."""
    saes = dict(saes or {})
    if RESIDUAL in saes:
        raise ValueError(f"an SAE may not be called {RESIDUAL!r}")
    out: dict[str, np.ndarray] = {}
    for batch in prefix_batches(model.tokenizer, items, batch_size, bos_id(model, prepend_bos)):
        x = model.run_to_hooks(batch.tokens, [hook])[hook]  # [B, T, d]
        rows = torch.arange(len(batch.index), device=x.device)
        last = batch.last.to(x.device)
        found = {RESIDUAL: x[rows, last]}
        for name, sae in saes.items():
            p = next(sae.parameters())
            codes = sae.encode(x.to(device=p.device, dtype=p.dtype))  # [B, T, d_sae]
            found[name] = codes[rows.to(p.device), last.to(p.device)]
        for name, f in found.items():
            if name not in out:
                out[name] = np.zeros((len(items), f.shape[-1]), dtype=np.float32)
            out[name][batch.index] = f.float().cpu().numpy()
    return out


def fit_probe(
    X_train, y_train, X_test, y_test, seed: int = 0, cs: Sequence[float] = CS, folds: int = 3
) -> float:
    """Test accuracy of a standardised L2 logistic regression whose C is picked by CV on train."""
    return float((predict_probe(X_train, y_train, X_test, seed, cs, folds) == np.asarray(y_test)).mean())


def predict_probe(
    X_train, y_train, X_test, seed: int = 0, cs: Sequence[float] = CS, folds: int = 3
) -> np.ndarray:
    """Test-set predictions of the dense probe (see `fit_probe`)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    X_train, X_test, y_train = np.asarray(X_train), np.asarray(X_test), np.asarray(y_train)
    keep = X_train.std(0) > 0  # constant columns (latents dead on this data) carry nothing
    if not keep.any():
        return np.full(len(X_test), np.bincount(y_train).argmax())
    mean, std = X_train[:, keep].mean(0), X_train[:, keep].std(0)
    clf = LogisticRegressionCV(
        Cs=list(cs), cv=StratifiedKFold(folds, shuffle=True, random_state=seed), max_iter=2000, tol=1e-3
    )
    with warnings.catch_warnings():  # sklearn 1.9 announces a change of fitted attributes we do not read
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit((X_train[:, keep] - mean) / std, y_train)
    return clf.predict((X_test[:, keep] - mean) / std)


def top_features(X_train, y_train, k: int) -> np.ndarray:
    """Indices of the k features with the largest |class-mean difference| on train, largest first."""
    X_train, y_train = np.asarray(X_train), np.asarray(y_train)
    diff = np.abs(X_train[y_train == 1].mean(0) - X_train[y_train == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def sparse_probe(X_train, y_train, X_test, y_test, k: int, seed: int = 0) -> dict:
    """{accuracy, features}: a probe on only the top-k features by class-mean difference."""
    idx = top_features(X_train, y_train, k)
    acc = fit_probe(np.asarray(X_train)[:, idx], y_train, np.asarray(X_test)[:, idx], y_test, seed)
    return {"accuracy": acc, "features": idx.tolist()}


def probe_report(
    features: Mapping[str, np.ndarray],
    items: Sequence[ProbeItem],
    seeds: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = KS,
    max_train: int = 2000,
    train_frac: float = 0.8,
) -> dict:
    """Dense and sparse probe accuracy per feature source, over seeds.

    Returns {"n_train", "n_test", "sources": {name: {"dense": stats, "sparse": {k: stats}}}}, where
    stats = {mean, std, ci95, per_seed} (+ "per_template" for dense, "features" of seed 0 for sparse).
    """
    y = np.array([it.label for it in items])
    split = np.array([it.split for it in items])
    test = np.flatnonzero(split == "test")
    train = np.flatnonzero(split == "train")
    if len(test) == 0 or len(train) == 0 or len(set(y[train])) < 2:
        raise ValueError("probe_report needs train items of both labels and test items")
    subsamples = [
        _balanced_subsample(train, y, min(max_train, int(train_frac * len(train))), s) for s in seeds
    ]
    templates = np.array([it.template for it in items])[test]
    report: dict = {"n_train": len(subsamples[0]), "n_test": len(test), "seeds": list(seeds), "sources": {}}
    for name, X in features.items():
        dense, per_template = [], []
        sparse: dict[int, list] = {k: [] for k in ks}
        for seed, tr in zip(seeds, subsamples, strict=True):
            ok = predict_probe(X[tr], y[tr], X[test], seed) == y[test]
            dense.append(float(ok.mean()))
            per_template.append({t: float(ok[templates == t].mean()) for t in np.unique(templates)})
            for k in ks:
                sparse[k].append(sparse_probe(X[tr], y[tr], X[test], y[test], min(k, X.shape[1]), seed))
        entry = {"dense": {**_stats(dense), "per_template": _mean_dicts(per_template)}, "sparse": {}}
        for k in ks:
            entry["sparse"][k] = {
                **_stats([r["accuracy"] for r in sparse[k]]),
                "features": sparse[k][0]["features"],
            }
        report["sources"][name] = entry
    return report


# ---- helpers -----------------------------------------------------------------------------------------
def _balanced_subsample(train: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [rng.permutation(train[y[train] == lab])[: n // 2] for lab in (0, 1)]
    return np.sort(np.concatenate(parts))


def _stats(values: Sequence[float]) -> dict:
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(t.ppf(0.975, len(v) - 1) * std / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": (mean - half, mean + half), "per_seed": v.tolist()}


def _mean_dicts(dicts: Sequence[dict]) -> dict:
    keys = sorted({k for d in dicts for k in d})
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in keys}
