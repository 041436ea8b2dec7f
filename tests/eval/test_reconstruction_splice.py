"""Reconstruction metrics and the spliced CE / KL scores, on SAEs whose answers are known."""

from __future__ import annotations

import pytest
import torch
from toys import IdentitySAE, LinearSAE, ZeroSAE, tiny_bridge

from tsae.eval import hooking
from tsae.eval.reconstruction import ReconstructionStats
from tsae.eval.splice import splice_scores

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def bridge():
    return tiny_bridge()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (4, 24), generator=g) for _ in range(3)]


def test_perfect_sae_scores_one_and_zero_sae_scores_zero(bridge, batches):
    saes = {"perfect": IdentitySAE(64), "zero": ZeroSAE(64)}
    res = splice_scores(bridge, batches, HOOK, saes)
    p, z = res["perfect"], res["zero"]
    assert p["ce_clean"] != p["ce_zero"]
    assert p["ce_score"] == pytest.approx(1.0, abs=1e-5)
    assert p["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert abs(p["kl_sae"]) < 1e-5 and abs(p["ce_delta"]) < 1e-5
    assert z["ce_score"] == pytest.approx(0.0, abs=1e-5)
    assert z["kl_score"] == pytest.approx(0.0, abs=1e-5)
    assert z["kl_sae"] > 0.01


def test_imperfect_sae_lies_between_and_error_term_restores_the_model(bridge, batches):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g) / 8
    sae = LinearSAE(W, torch.zeros(128), torch.linalg.pinv(W) * 0.7)  # a lossy reconstruction
    lossy = splice_scores(bridge, batches, HOOK, {"s": sae})["s"]
    # a random model can even predict random tokens better when perturbed, so CE is not asserted
    assert lossy["kl_sae"] > 1e-4 and lossy["kl_score"] < 1 and lossy["ce_delta"] != 0
    kept = splice_scores(bridge, batches, HOOK, {"s": sae}, keep_error=True)["s"]
    assert kept["ce_score"] == pytest.approx(1.0, abs=1e-4) and kept["kl_sae"] < 1e-6


def test_skipped_positions_stay_clean(bridge, batches):
    # Zero-ablating only positions >= 3 leaves the predictions at positions < 3 untouched.
    tokens = batches[0]
    with torch.no_grad():
        clean = hooking.forward(bridge, tokens, HOOK)
        zeroed = hooking.forward(bridge, tokens, HOOK, hooking.splice(ZeroSAE(64), skip=3))
    assert torch.equal(clean[:, :3], zeroed[:, :3])
    assert (clean[:, 3:] - zeroed[:, 3:]).abs().max() > 1e-2


def test_reconstruction_stats_stream_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 8, generator=g) * 3 + 5  # a large common mean: FVU must centre it
    x_hat = x + 0.3 * torch.randn(6, 10, 8, generator=g)
    codes = torch.zeros(6, 10, 5)
    codes[..., 0] = 1.0  # always on: dense
    codes[:, ::2, 1] = 2.0  # half the tokens: dense
    codes[0, 0, 2] = 1.0  # 1 token of 60: alive, not dense
    stats = ReconstructionStats(5)
    for i in range(0, 6, 2):
        stats.update(x[i:i + 2], x_hat[i:i + 2], codes[i:i + 2])
    r = stats.result()
    flat, flat_hat = x.reshape(-1, 8).double(), x_hat.reshape(-1, 8).double()
    fvu = ((flat - flat_hat) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    assert r["fvu"] == pytest.approx(float(fvu), rel=1e-9)
    assert r["explained_variance"] == pytest.approx(1 - float(fvu), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(flat, flat_hat, dim=-1).mean()
    assert r["cos_sim"] == pytest.approx(float(cos), rel=1e-9)
    assert r["l0"] == pytest.approx(1 + 0.5 + 1 / 60)
    assert r["frac_dead"] == pytest.approx(2 / 5) and r["frac_dense"] == pytest.approx(2 / 5)
    assert r["seq_l0"] == pytest.approx(2 + 1 / 6)


def test_identity_sae_has_zero_fvu(bridge, batches):
    cap = {}
    with torch.no_grad():
        hooking.forward(bridge, batches[0], HOOK, capture=cap)
    sae = IdentitySAE(64)
    stats = ReconstructionStats(128)
    codes = sae.encode(cap["x"])
    stats.update(cap["x"], sae.decode(codes), codes)
    r = stats.result()
    assert r["fvu"] == 0.0 and r["cos_sim"] == pytest.approx(1.0)
    assert r["l0"] == pytest.approx(64, abs=1)  # one of the +/- pair per dimension
