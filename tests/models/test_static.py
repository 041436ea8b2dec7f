"""Static SAEs: shapes, losses, TopK/aux-k behaviour, init, b_dec init, scale folding, persistence."""

import pytest
import torch

from tsae.models import ReluL1SAE, TopKSAE
from tsae.models.activity import FiringTracker
from tsae.models.registry import load_sae
from tsae.models.relu_l1 import ReluL1Config
from tsae.models.static import geometric_median
from tsae.models.topk import TopKConfig


def _topk(**kw):
    return TopKSAE(TopKConfig(d_in=16, d_sae=48, k=4, seed=1, **kw))


def _relu():
    sae = ReluL1SAE(ReluL1Config(d_in=16, d_sae=48, l1=0.3, seed=2))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    return sae


def test_shapes_and_tied_unit_norm_init():
    for sae in (_topk(), _relu()):
        x = torch.randn(3, 5, 16)
        out = sae(x)
        assert out.x_hat.shape == (3, 5, 16) and out.codes.shape == (3, 5, 48)
        assert (out.codes >= 0).all()
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)
    fresh = _topk()
    assert torch.equal(fresh.W_enc, fresh.W_dec.T)
    assert torch.equal(fresh.dictionary, fresh.W_dec)


def test_relu_l1_loss_matches_hand_computation():
    sae = _relu()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 48)[:, None])  # non-unit norms matter in the L1 term
    x = torch.randn(2, 3, 16)
    out = sae(x)
    terms = sae.loss_terms(x, out, {"l1": 0.7})
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    mse_sum, l1_sum = 0.0, 0.0
    for tok in x.reshape(-1, 16):
        f = torch.clamp(W_enc.T @ (tok - b_dec) + b_enc, min=0)
        x_hat = W_dec.T @ f + b_dec
        mse_sum += ((tok - x_hat) ** 2).sum().item()
        l1_sum += sum(f[i].item() * W_dec[i].norm().item() for i in range(48))
    assert terms["mse"].item() == pytest.approx(mse_sum / 6, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(l1_sum / 6, rel=1e-5)
    assert terms["loss"].item() == pytest.approx((mse_sum + 0.7 * l1_sum) / 6, rel=1e-5)
    assert sae.loss_terms(x, out, {})["loss"].item() == pytest.approx((mse_sum + 0.3 * l1_sum) / 6, rel=1e-5)


def test_topk_exactly_k_active_and_k_override():
    sae = _topk()
    x = torch.randn(4, 6, 16)
    out = sae(x)
    assert ((out.codes > 0).sum(-1) == 4).all()
    terms = sae.loss_terms(x, out, {"k": 9})
    assert terms["l0"].item() == 9
    codes9 = TopKSAE.from_config_dict({**sae.config_dict(), "k": 9})
    codes9.load_state_dict(sae.state_dict())
    assert terms["mse"].item() == pytest.approx(
        ((x - codes9(x).x_hat) ** 2).sum(-1).mean().item(), rel=1e-6)
    assert sae.loss_terms(x, out, {})["l0"].item() == 4


def test_set_coeffs_k_sparsifies_once_in_the_forward():
    """k annealing as the trainer runs it: set_coeffs before forward, so the forward already
    sparsifies at the step's k and the loss uses its codes and x_hat (no second TopK + decode)."""
    sae = _topk().train()
    x = torch.randn(4, 6, 16)
    sae.set_coeffs({"k": 9})
    out = sae(x)
    assert ((out.codes > 0).sum(-1) == 9).all()
    codes, x_hat, terms = sae.sparse_terms(x, out, {"k": 9})
    assert codes is out.codes and x_hat is out.x_hat and terms["l0"].item() == 9
    sae.set_coeffs({})
    assert ((sae(x).codes > 0).sum(-1) == 4).all()
    assert sae.eval()(x).codes.ne(0).sum(-1).eq(4).all()  # inference: cfg.k


def test_auxk_zero_without_dead_and_reaches_only_dead_latents():
    sae = _topk(dead_window_tokens=100, k_aux=6)
    sae.train()
    x = torch.randn(4, 5, 16)
    out = sae(x)
    terms = sae.loss_terms(x, out, {})
    assert terms["auxk"].item() == 0.0 and terms["dead_frac"].item() == 0.0
    # Pretend latents 0..9 have been silent for a long time and do not fire now.
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:10] = True
    with torch.no_grad():
        sae.b_enc[dead] = -20.0  # keep them out of the TopK this step
    out = sae(x)
    assert (out.codes[..., dead] == 0).all()
    sae.activity.tokens_since_fired[dead] = 1000
    terms = sae.loss_terms(x, out, {"auxk": 1.0})
    assert terms["dead_frac"].item() == pytest.approx(10 / 48)
    assert terms["auxk"].item() > 0
    sae.zero_grad()
    terms["auxk"].backward()
    row_grad = sae.W_dec.grad.abs().sum(-1)
    col_grad = sae.W_enc.grad.abs().sum(0)
    assert (row_grad[dead] > 0).any() and (row_grad[~dead] == 0).all()
    assert (col_grad[~dead] == 0).all() and (sae.b_enc.grad[~dead] == 0).all()


def test_firing_tracker_counts_tokens_since_fired():
    tr = FiringTracker(3)
    tr.update(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    tr.update(torch.tensor([[0.0, 2.0, 0.0]]))
    assert tr.tokens_since_fired.tolist() == [1, 0, 3]
    assert tr.dead_mask(3).tolist() == [False, False, True]
    assert tr.frequency().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert "tokens_since_fired" in tr.state_dict()


def test_geometric_median_robust_to_outliers():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=g)
    inliers = centre + 0.3 * torch.randn(400, 8, generator=g)
    outliers = centre + 50.0 + 5 * torch.randn(40, 8, generator=g)
    pts = torch.cat([inliers, outliers])
    gm_err = (geometric_median(pts) - centre).norm().item()
    mean_err = (pts.mean(0) - centre).norm().item()
    assert gm_err < 0.2 * mean_err, (gm_err, mean_err)
    sae = ReluL1SAE(ReluL1Config(d_in=8, d_sae=16))
    sae.init_b_dec(pts)
    assert torch.allclose(sae.b_dec, geometric_median(pts))
    sae.init_b_dec(pts, method="mean")
    assert torch.allclose(sae.b_dec, pts.mean(0))
    with pytest.raises(ValueError, match="unknown b_dec init"):
        sae.init_b_dec(pts, method="median")


@pytest.mark.parametrize("make", [_topk, _relu])
def test_fold_input_scale_exact(make):
    sae = make()
    x = 3 * torch.randn(2, 7, 16) + 1
    s = 0.37
    ref = sae(s * x)
    sae.fold_input_scale(s)
    folded = sae(x)
    assert torch.allclose(folded.codes, ref.codes, atol=1e-5)
    assert torch.allclose(folded.x_hat, ref.x_hat / s, atol=1e-5)


@pytest.mark.parametrize("make", [_topk, _relu])
def test_save_load_round_trip(make, tmp_path):
    sae = make()
    sae.activity.update(torch.rand(2, 3, 48) > 0.5)
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    x = torch.randn(2, 4, 16)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    assert torch.equal(back.activity.tokens_since_fired, sae.activity.tokens_since_fired)
