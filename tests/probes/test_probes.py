"""Probes recover planted signal and nothing from noise; features are read at the right position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsae.eval.probing import ProbeItem, by_split, make_task
from tsae.eval.probing.probes import collect_features, fit_probe, probe_report, sparse_probe, top_features

PLANTED = 17


def synthetic(n: int, d: int = 50, shift: float = 6.0, seed: int = 0):
    """Gaussian features; the label moves dimension PLANTED by `shift` standard deviations."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    noise = rng.standard_normal((n, d)).astype(np.float32)
    planted = noise.copy()
    planted[:, PLANTED] += shift * y
    return planted, noise, y


def fake_items(y, split):
    return [
        ProbeItem("t", f"tpl{i % 3}", f"p{split}{i}", int(lab), str(lab), " a", " b", split)
        for i, lab in enumerate(y)
    ]


def test_sparse_probe_finds_planted_dimension():
    X, noise, y = synthetic(3000)
    tr, te = slice(0, 2000), slice(2000, None)
    assert top_features(X[tr], y[tr], 1).tolist() == [PLANTED]
    one = sparse_probe(X[tr], y[tr], X[te], y[te], k=1)
    assert one["features"] == [PLANTED] and one["accuracy"] > 0.98
    assert fit_probe(X[tr], y[tr], X[te], y[te]) > 0.98
    for acc in (
        fit_probe(noise[tr], y[tr], noise[te], y[te]),
        sparse_probe(noise[tr], y[tr], noise[te], y[te], k=5)["accuracy"],
    ):
        assert 0.42 < acc < 0.58


def test_probe_report_over_seeds():
    X, noise, y = synthetic(2400)
    items = fake_items(y[:1400], "train") + fake_items(y[1400:], "test")
    rep = probe_report({"planted": X, "noise": noise}, items, seeds=(0, 1, 2), max_train=1000)
    assert rep["n_test"] == 1000 and rep["n_train"] == 1000
    planted, noise_rep = rep["sources"]["planted"], rep["sources"]["noise"]
    assert planted["sparse"][1]["mean"] > 0.98 and planted["sparse"][1]["features"] == [PLANTED]
    assert planted["dense"]["mean"] > 0.98 and len(planted["dense"]["per_seed"]) == 3
    assert set(planted["dense"]["per_template"]) == {"tpl0", "tpl1", "tpl2"}
    for k in (1, 5, 20):
        assert 0.42 < noise_rep["sparse"][k]["mean"] < 0.58
    lo, hi = noise_rep["dense"]["ci95"]
    assert lo <= noise_rep["dense"]["mean"] <= hi and noise_rep["dense"]["std"] > 0  # seeds really differ


class CumulativeSAE(torch.nn.Module):
    """A causal temporal stand-in: the code at t is relu of the running sum of x[:t+1] @ W."""

    def __init__(self, d_in: int, d_sae: int = 8):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(0)))

    def encode(self, x):
        return torch.relu(torch.cumsum(x @ self.W, dim=1))


def test_collect_features_reads_decision_point_of_whole_prefix(tiny_model, tokenizer):
    items = by_split(make_task("coreference", tokenizer, n_test=40, n_train=10), "test")[:12]
    hook = tiny_model.hook_name(1)
    sae = CumulativeSAE(tiny_model.d_model)
    feats = collect_features(tiny_model, items, hook, {"cum": sae}, batch_size=5)
    assert feats["residual"].shape == (12, tiny_model.d_model) and feats["cum"].shape == (12, 8)
    for i in (0, 7, 11):  # one item at a time, no padding, BOS first
        ids = torch.tensor(
            [[tokenizer.bos_token_id, *tokenizer.encode(items[i].prefix, add_special_tokens=False)]]
        )
        x = tiny_model.run_to_hooks(ids, [hook])[hook]
        np.testing.assert_allclose(feats["residual"][i], x[0, -1].numpy(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            codes = sae.encode(x)[0, -1].numpy()
        np.testing.assert_allclose(feats["cum"][i], codes, rtol=1e-4, atol=1e-4)


def test_tiny_random_model_is_at_chance(tiny_model, tokenizer):
    from tsae.eval.probing.behaviour import behavioural_accuracy

    items = by_split(make_task("agreement", tokenizer, n_test=200, n_train=10), "test")
    res = behavioural_accuracy(tiny_model, items)
    assert res["n"] == 200 and abs(res["accuracy"] - 0.5) < 0.12 and not res["above_chance"]
    assert res["ci95"][0] < 0.5 < res["ci95"][1]


@pytest.mark.real_model
def test_smollm2_agreement_and_coreference_above_chance(smollm2):
    from tsae.eval.probing.behaviour import behavioural_accuracy

    agreement = by_split(make_task("agreement", smollm2.tokenizer, n_test=1000, n_train=10), "test")[:96]
    res = behavioural_accuracy(smollm2, agreement)
    assert res["above_chance"] and res["accuracy"] >= 0.6, res  # measured 0.69 on 160 items
    assert res["per_template"]["simple"]["accuracy"] >= 0.85  # no attractor: nearly always right
    coref = by_split(make_task("coreference", smollm2.tokenizer, n_test=1000, n_train=10), "test")[:32]
    res = behavioural_accuracy(smollm2, coref)
    assert res["above_chance"] and res["accuracy"] >= 0.75, res
