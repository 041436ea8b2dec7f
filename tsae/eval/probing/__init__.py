"""Temporal probing tasks: generated items, the model's behavioural check, probes on residuals and SAE codes.

    items = make_task("agreement", tokenizer, n_test=1000, n_train=2000, seed=0)  # list[ProbeItem]
    behavioural_accuracy(model, by_split(items, "test"))  # can the model do it?
    feats = collect_features(model, items, hook, saes)  # {"residual": X, name: codes}
    probe_report(feats, items)  # dense and top-k sparse probes

See docs/probes.md for templates, vocabulary splits and decision positions.
"""

from __future__ import annotations

from tsae.eval.probing.agreement import make_agreement
from tsae.eval.probing.behaviour import behavioural_accuracy, logit_margins
from tsae.eval.probing.coreference import make_coreference
from tsae.eval.probing.disambiguation import make_disambiguation
from tsae.eval.probing.items import ProbeItem, VocabularyError, by_split, prefix_batches
from tsae.eval.probing.probes import collect_features, fit_probe, probe_report, sparse_probe
from tsae.eval.probing.sfc_format import read_sfc, write_sfc

TASKS = ("agreement", "coreference", "disambiguation")
_MAKERS = {
    "agreement": make_agreement,
    "coreference": make_coreference,
    "disambiguation": make_disambiguation,
}


def make_task(
    name: str, tokenizer, n_test: int = 1000, n_train: int = 2000, seed: int = 0, **kw
) -> list[ProbeItem]:
    """Task `name` (one of TASKS): `n_test` test then `n_train` train items, balanced, disjoint vocab."""
    if name not in _MAKERS:
        raise ValueError(f"unknown probing task {name!r}; choose one of {', '.join(TASKS)}")
    return _MAKERS[name](tokenizer, n_test=n_test, n_train=n_train, seed=seed, **kw)


__all__ = [
    "TASKS",
    "ProbeItem",
    "VocabularyError",
    "behavioural_accuracy",
    "by_split",
    "collect_features",
    "fit_probe",
    "logit_margins",
    "make_agreement",
    "make_coreference",
    "make_disambiguation",
    "make_task",
    "prefix_batches",
    "probe_report",
    "read_sfc",
    "sparse_probe",
    "write_sfc",
]
