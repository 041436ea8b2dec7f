"""Temporal baselines: T-SAE (contrastive Matryoshka BatchTopK) and the causal temporal crosscoder."""

import json

import pytest
import torch

from tsae.models import ContrastiveTemporalSAE, ReluL1SAE, TemporalCrosscoder, TopKSAE
from tsae.models.crosscoder import CrosscoderConfig
from tsae.models.registry import load_sae
from tsae.models.relu_l1 import ReluL1Config
from tsae.models.saelens_format import save_saelens
from tsae.models.t_sae import ContrastiveTSAEConfig, info_nce, sample_partners
from tsae.models.topk import TopKConfig

D_IN, D_SAE, N_FEAT = 32, 64, 48


def _dictionary():
    d = torch.randn(N_FEAT, D_IN, generator=torch.Generator().manual_seed(0))
    return d / d.norm(dim=-1, keepdim=True)


def planted(B, T, seed):
    """Sequences from a planted unit-norm dictionary; each feature is a persistent on/off Markov chain
    (switches on w.p. 0.015, stays on w.p. 0.8), so ~3 features are active per token."""
    g, D = torch.Generator().manual_seed(seed), _dictionary()
    on, xs = torch.zeros(B, N_FEAT, dtype=torch.bool), []
    for _ in range(T):
        on = (on & (torch.rand(B, N_FEAT, generator=g) < 0.8)) | (torch.rand(B, N_FEAT, generator=g) < 0.015)
        xs.append((on * (0.5 + torch.rand(B, N_FEAT, generator=g))) @ D)
    return torch.stack(xs, 1) + 0.02 * torch.randn(B, T, D_IN, generator=g)


def fvu(x, x_hat):
    flat = x.reshape(-1, x.shape[-1])
    return float(((x - x_hat.detach()) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum())


def train(model, steps, seed=1):
    torch.manual_seed(seed)
    model.init_b_dec(planted(64, 16, seed=100))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x = planted(32, 16, seed=1000 + step)
        terms = model.loss_terms(x, model(x), {})
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        model.after_step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def trained_tsae():
    cfg = ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, threshold_start_steps=50, threshold_beta=0.99)
    return train(ContrastiveTemporalSAE(cfg), 300)


@pytest.fixture(scope="module")
def trained_crosscoder():
    return train(TemporalCrosscoder(CrosscoderConfig(d_in=D_IN, d_sae=D_SAE, k=6, window=2)), 300)


def _models():
    return [
        TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=4)),
        ReluL1SAE(ReluL1Config(d_in=D_IN, d_sae=D_SAE)),
        ContrastiveTemporalSAE(ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)),
        TemporalCrosscoder(CrosscoderConfig(d_in=D_IN, d_sae=D_SAE, k=4, window=3)),
    ]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.architecture)
def test_causal_and_shapes(model):
    model.eval()
    x = planted(3, 10, seed=5)
    out = model(x)
    assert out.codes.shape == (3, 10, D_SAE) and out.x_hat.shape == (3, 10, D_IN)
    assert (out.codes >= 0).all()
    assert torch.equal(model.decode(out.codes), out.x_hat)  # decode is a function of the codes alone
    t = 6
    x2 = x.clone()
    x2[:, t + 1 :] += 5 * torch.randn(3, 10 - t - 1, D_IN)
    out2 = model(x2)
    assert torch.equal(out2.codes[:, : t + 1], out.codes[:, : t + 1])
    assert not torch.equal(out2.codes[:, t + 1 :], out.codes[:, t + 1 :])


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.architecture)
def test_save_load_round_trip_every_architecture(model, tmp_path):
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_()
    model.train()
    x = planted(4, 8, seed=3)
    model.loss_terms(x, model(x), {})  # fills firing statistics (and T-SAE's step counter)
    model.eval()
    back = load_sae(model.save(tmp_path / model.architecture))
    assert type(back) is type(model) and back.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert torch.equal(back(x).x_hat, model(x).x_hat)


# ---- T-SAE ---------------------------------------------------------------------------------------
def test_partners_are_earlier_positions_of_the_same_sequence():
    torch.manual_seed(0)
    seq, t, p = sample_partners(200, 12, "random")
    assert len(t) == 200 * 11 and (p < t).all() and (p >= 0).all()
    assert torch.equal(seq, torch.arange(200).repeat_interleave(11))
    counts = torch.bincount(p[t == 11], minlength=11)  # uniform over all 11 earlier positions
    assert counts.min() > 5 and counts.max() < 40, counts
    _, t, p = sample_partners(2, 4, "previous")
    assert (p == t - 1).all()
    with pytest.raises(ValueError, match="partner mode"):
        sample_partners(2, 4, "next")


def test_info_nce_lower_when_partners_aligned():
    g = torch.Generator().manual_seed(0)
    anchor = 3 * torch.rand(64, 12, generator=g) * (torch.rand(64, 12, generator=g) < 0.3)
    aligned = anchor + 0.1 * torch.rand(64, 12, generator=g)
    shuffled = aligned[torch.randperm(64, generator=g)]
    for sim, temp in (("dot", 1.0), ("cosine", 0.1)):
        good = info_nce(anchor, aligned, temperature=temp, similarity=sim).item()
        bad = info_nce(anchor, shuffled, temperature=temp, similarity=sim).item()
        assert good < 0.5 * bad, (sim, good, bad)


def test_contrastive_term_rewards_codes_persistent_within_a_sequence():
    sae = ContrastiveTemporalSAE(ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, high_fraction=0.25))
    g = torch.Generator().manual_seed(0)
    topic = 3 * torch.rand(16, 1, D_SAE, generator=g) * (torch.rand(16, 1, D_SAE, generator=g) < 0.3)
    persistent = topic.expand(16, 8, D_SAE) + 0.1 * torch.rand(16, 8, D_SAE, generator=g)
    # The same codes with tokens scattered across sequences: no persistence left.
    flickering = persistent.reshape(-1, D_SAE)[torch.randperm(128, generator=g)].reshape(16, 8, D_SAE)
    torch.manual_seed(0)
    assert sae.contrastive_loss(persistent) < 0.5 * sae.contrastive_loss(flickering)


def test_tsae_training_batch_topk_and_loss_terms():
    sae = ContrastiveTemporalSAE(ContrastiveTSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, seed=4))
    sae.train()
    x = planted(4, 8, seed=9)
    out = sae(x)
    assert int((out.codes > 0).sum()) == 3 * 4 * 8  # BatchTopK: k * n_tokens over the batch
    terms = sae.loss_terms(x, out, {"contrastive": 0.0})
    H = sae.n_high
    assert H == int(0.2 * D_SAE)
    high = out.codes[..., :H] @ sae.W_dec[:H] + sae.b_dec
    assert terms["matryoshka_high"].item() == pytest.approx(((x - high) ** 2).sum(-1).mean().item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(
        0.2 * terms["matryoshka_high"].item() + 0.8 * terms["mse"].item(), rel=1e-5)
    assert terms["contrastive"].item() > 0


def test_tsae_threshold_inference_matches_batch_topk_l0(trained_tsae):
    sae = trained_tsae
    x = planted(64, 16, seed=7)
    assert sae.threshold.item() > 0
    l0_infer = (sae(x).codes > 0).float().sum(-1).mean().item()
    assert abs(l0_infer - sae.cfg.k) / sae.cfg.k < 0.3, l0_infer
    assert fvu(x, sae(x).x_hat) < 0.2
    sae.train()
    with torch.no_grad():
        assert (sae(x).codes > 0).float().sum(-1).mean().item() == sae.cfg.k
    sae.eval()


def test_tsae_fold_input_scale_and_saelens_jumprelu_export(trained_tsae, tmp_path):
    sae = ContrastiveTemporalSAE(trained_tsae.cfg)
    sae.load_state_dict(trained_tsae.state_dict())
    sae.eval()
    x, s = 4 * planted(4, 8, seed=11), 0.25
    ref = sae(s * x)
    sae.fold_input_scale(s)
    folded = sae(x)
    assert torch.equal(folded.codes > 0, ref.codes > 0)
    assert torch.allclose(folded.codes, ref.codes, atol=1e-5)
    assert torch.allclose(folded.x_hat, ref.x_hat / s, atol=1e-5)
    folder = save_saelens(sae, tmp_path / "jumprelu")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    from safetensors.torch import load_file
    w = load_file(str(folder / "sae_weights.safetensors"))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    f = pre.relu() * (pre > w["threshold"])  # SAELens's JumpReLU
    assert torch.allclose(f @ w["W_dec"] + w["b_dec"], folded.x_hat, atol=1e-5)


# ---- crosscoder ----------------------------------------------------------------------------------
def test_crosscoder_window_loss_matches_hand_computation():
    cc = TemporalCrosscoder(CrosscoderConfig(d_in=D_IN, d_sae=D_SAE, k=5, window=3, seed=2))
    with torch.no_grad():
        cc.b_dec.normal_()
    x = planted(2, 5, seed=4)
    out = cc(x)
    terms = cc.loss_terms(x, out, {})
    z = out.codes
    per_lag = []
    for j in range(3):
        errs = [((x[b, t - j] - (z[b, t] @ cc.W_dec[j] + cc.b_dec[j])) ** 2).sum()
                for b in range(2) for t in range(j, 5)]
        per_lag.append(torch.stack(errs).mean())
    assert terms["mse"].item() == pytest.approx(per_lag[0].item(), rel=1e-5)
    assert terms["mse_window"].item() == pytest.approx(sum(per_lag).item(), rel=1e-5)
    assert terms["mse"].item() == pytest.approx(((x - out.x_hat) ** 2).sum(-1).mean().item(), rel=1e-5)
    # The encoder reads x_{t-j} through W_enc[j]; positions before 0 contribute nothing.
    pre = torch.stack([sum((x[:, t - j] - cc.b_dec[j]) @ cc.W_enc[j] for j in range(3) if t - j >= 0)
                       + cc.b_enc for t in range(5)], 1)
    assert torch.allclose(out.aux["pre"], pre, atol=1e-5)
    cc.after_step()
    assert torch.allclose(cc.W_dec.pow(2).sum((0, 2)), torch.ones(D_SAE), atol=1e-5)


def test_crosscoder_learns_planted_dictionary(trained_crosscoder):
    cc = trained_crosscoder
    x = planted(64, 16, seed=7)
    untrained = TemporalCrosscoder(cc.cfg)
    untrained.init_b_dec(planted(64, 16, seed=100))
    before, after = fvu(x, untrained(x).x_hat), fvu(x, cc(x).x_hat)
    assert after < 0.3 and after < 0.5 * before, (before, after)
    assert ((cc(x).codes > 0).sum(-1) <= cc.cfg.k).all()


def test_crosscoder_fold_input_scale_exact(trained_crosscoder):
    cc = TemporalCrosscoder(trained_crosscoder.cfg)
    cc.load_state_dict(trained_crosscoder.state_dict())
    x, s = 3 * planted(3, 9, seed=12), 0.4
    ref = cc(s * x)
    cc.fold_input_scale(s)
    folded = cc(x)
    assert torch.allclose(folded.codes, ref.codes, atol=1e-5)
    assert torch.allclose(folded.x_hat, ref.x_hat / s, atol=1e-5)
    with pytest.raises(ValueError, match="no SAELens equivalent"):
        save_saelens(cc, "/nonexistent")
