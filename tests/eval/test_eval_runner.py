"""The evaluation stage end to end: a tiny-model store, three SAE folders, every metric group."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.errors import UserError
from pipeline.eval_runner import EvalConfig, run_eval

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store_key(tiny_model, tmp_path_factory):
    from pipeline.cache_runner import CacheConfig, build_cache

    home = tmp_path_factory.mktemp("cache")
    res = build_cache(CacheConfig(model="tiny", layers=(0,), ctx=32, max_tokens=2400, cache_dir=str(home),
                                  chunk_seqs=8, progress=False), model=tiny_model)
    return res.location


def _sae_folders(root):
    from tsae.models.crosscoder import CrosscoderConfig, TemporalCrosscoder
    from tsae.models.topk import TopKConfig, TopKSAE
    from tsae.models.tsae import TemporalSAE, TSAEConfig

    made = {
        "topk": TopKSAE(TopKConfig(d_in=64, d_sae=96, k=8, hook_name=HOOK)),
        "tsae": TemporalSAE(TSAEConfig(d_in=64, d_sae=96, k=8, window=4, lstm_hidden=16, hook_name=HOOK)),
        "crosscoder": TemporalCrosscoder(CrosscoderConfig(d_in=64, d_sae=96, k=8, window=3, hook_name=HOOK)),
    }
    return [str(sae.save(root / name)) for name, sae in made.items()]


def _finite(obj):
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_run_eval_writes_finite_metrics_for_every_sae(tiny_model, store_key, tmp_path):
    folders = _sae_folders(tmp_path / "saes")
    out = tmp_path / "eval"
    cfg = EvalConfig(saes=folders, store=store_key, out_dir=str(out), model="tiny", n_seqs=8, batch_size=4,
                     reach_features=2, reach_sites=4, reach_k=3, probe_tasks=("agreement",), probe_n_test=8,
                     probe_n_train=8, faithfulness_items=8, faithfulness_sizes=(1, 5), log=False)
    results = run_eval(cfg, model=tiny_model)
    assert set(results) == {"topk", "tsae", "crosscoder"}
    for name in results:
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["hook"] == HOOK and m["eval"]["n_seqs"] == 8 and m["eval"]["skip"] == 1
        for group in ("reconstruction", "splice", "stability", "lifetimes", "reach", "faithfulness"):
            assert group in m, (name, group)
        r, s = m["reconstruction"], m["splice"]
        assert r["n_tokens"] == 8 * 31 and 0 < r["l0"] <= 8
        assert all(isinstance(s[k], float) for k in ("ce_score", "ce_delta", "kl_sae", "kl_score"))
        assert 0 <= m["stability"]["tss"] <= 1 and m["reach"]["max_abs_dlogit_before"] == 0.0
        curve = m["faithfulness"]["agreement"]
        assert curve["sizes"] == [0, 1, 5, 96] and curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
        for group in ("reconstruction", "splice", "lifetimes"):
            assert _finite(m[group]), (name, group)
        feats = json.loads((out / name / "features.json").read_text())
        assert len(feats["firing_rate"]) == 96
    probe = json.loads((out / "probes" / "agreement.json").read_text())
    assert probe["behaviour"]["n"] == 8 and set(probe["faithfulness"]) == set(results)
    assert set(probe["probes"]["sources"]) == {"residual", *results}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["saes"]) == set(results) and "splice.ce_score" in summary["saes"]["topk"]


def test_run_eval_rejects_bad_input_in_one_line(tiny_model, store_key, tmp_path):
    with pytest.raises(UserError, match="not an SAE folder"):
        run_eval(EvalConfig(saes=[str(tmp_path)], store=store_key, log=False), model=tiny_model)
    folders = _sae_folders(tmp_path / "s")
    with pytest.raises(UserError, match="unknown metric"):
        run_eval(EvalConfig(saes=folders, store=store_key, metrics=("tss",), log=False), model=tiny_model)
