"""TemporalSAE: exact static limit, causality, window, ablations, persistence, training benefit."""

import warnings

import pytest
import torch

from tsae.models.carry_coefficients import carry_coefficients
from tsae.models.lifecycle import ages
from tsae.models.lstm_gates import lifecycle_input
from tsae.models.registry import load_sae
from tsae.models.topk import TopKConfig, TopKSAE
from tsae.models.tsae import TemporalSAE
from tsae.models.window_memory import causal_windows, nonzero_flat, sparse_project, window_sum

D, F, K = 16, 48, 4


def _static(seed=0) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=F, k=K, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial biases so exactness is not an accident of zeros
        sae.b_enc.copy_(0.3 * torch.randn(F, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=g))
    return sae


def _opened(model: TemporalSAE, seed=1) -> TemporalSAE:
    """Gates open and every temporal parameter moved away from its (closed) init."""
    g = torch.Generator().manual_seed(seed)
    model.set_coeffs({"gate_open": 1.0})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("bridge.", "gates.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _x(B=3, T=20, seed=2):
    return 2.0 * torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


FLAG_VARIANTS = [dict(use_lstm=False), dict(use_gates=False), dict(use_bridge=False),
                 dict(use_lifecycle_input=False), dict(use_temporal_decoder=False), dict(window=4),
                 dict(window=1)]


@pytest.mark.parametrize("flags", [{}, *FLAG_VARIANTS])
def test_gates_shut_is_exactly_the_static_sae(flags):
    static = _static()
    model = _opened(TemporalSAE.from_static(static, **flags))
    model.set_coeffs({"gate_open": 0.0})
    x = _x()
    out, ref = model(x), static(x)
    assert torch.equal(out.codes, ref.codes) and torch.equal(out.x_hat, ref.x_hat)
    assert torch.equal(model.decode(model.encode(x)), ref.x_hat)


def test_bridges_start_closed_so_fresh_model_is_static_even_when_open():
    static = _static()
    model = TemporalSAE.from_static(static)
    model.set_coeffs({"gate_open": 1.0})
    x = _x()
    out, ref = model(x), static(x)
    assert torch.equal(out.codes, ref.codes) and torch.equal(out.x_hat, ref.x_hat)
    assert not torch.equal(_opened(model)(x).x_hat, ref.x_hat)


def test_causal_in_time():
    model = _opened(TemporalSAE.from_static(_static(), window=4))
    x = _x(T=24)
    out = model(x)
    for t in (0, 7, 15):
        x2 = x.clone()
        x2[:, t + 1 :] += 3.0 * torch.randn_like(x2[:, t + 1 :])
        out2 = model(x2)
        assert torch.equal(out2.codes[:, : t + 1], out.codes[:, : t + 1])
        assert torch.equal(out2.x_hat[:, : t + 1], out.x_hat[:, : t + 1])
        assert not torch.equal(out2.x_hat[:, t + 1 :], out.x_hat[:, t + 1 :])


def test_window_bounds_the_receptive_field():
    w, t = 4, 15
    model = _opened(TemporalSAE.from_static(_static(), window=w))
    x = _x(T=20)
    out = model(x)

    def perturbed(pos):
        x2 = x.clone()
        x2[:, pos] += 5.0 * torch.randn(x.shape[0], D, generator=torch.Generator().manual_seed(pos))
        return model(x2)

    # codes at t read x_{t-w..t}
    assert torch.equal(perturbed(t - w - 1).codes[:, t], out.codes[:, t])
    assert not torch.equal(perturbed(t - 1).codes[:, t], out.codes[:, t])
    assert not torch.equal(perturbed(t - w).codes[:, t], out.codes[:, t])
    # x_hat at t reads codes f_{t-w+1..t}, hence x_{t-2w+1..t}
    assert torch.equal(perturbed(t - 2 * w).x_hat[:, t], out.x_hat[:, t])
    assert not torch.equal(perturbed(t - 2 * w + 1).x_hat[:, t], out.x_hat[:, t])


def test_causal_windows_layout():
    u = torch.arange(1.0, 6.0).view(1, 5, 1)  # u_t = t + 1
    strict = causal_windows(u, 3, include_current=False)[0, :, :, 0]
    incl = causal_windows(u, 3, include_current=True)[0, :, :, 0]
    assert strict.tolist()[3] == [1.0, 2.0, 3.0] and strict.tolist()[0] == [0.0, 0.0, 0.0]
    assert incl.tolist()[3] == [2.0, 3.0, 4.0] and incl.tolist()[0] == [0.0, 0.0, 1.0]


def test_lifecycle_input_is_shifted_capped_age():
    codes = torch.relu(torch.randn(2, 30, 7, generator=torch.Generator().manual_seed(0)) + 0.5)
    w = 5
    (b, t, f), value = lifecycle_input(codes, w)
    dense = torch.zeros_like(codes)
    dense[b, t, f] = value
    expected = torch.zeros_like(codes)
    expected[:, 1:] = ages(codes > 0)[:, :-1].clamp(max=w).float() / w
    assert torch.equal(dense, expected)


def test_shared_nonzero_indices_give_what_each_op_finds_itself():
    g = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(2, 12, 9, generator=g))
    codes[0, 4, :3] = -1.0  # an edited code: nonzero but not active
    P = torch.randn(9, 4, generator=g)
    nz = nonzero_flat(codes)
    assert torch.equal(sparse_project(codes, P, nz), sparse_project(codes, P))
    assert torch.equal(window_sum(codes, 3, nz), window_sum(codes, 3))
    (coords, value), (coords_nz, value_nz) = lifecycle_input(codes, 4), lifecycle_input(codes, 4, nz)
    assert all(torch.equal(a, b) for a, b in zip(coords, coords_nz, strict=True))
    assert torch.equal(value, value_nz)


@pytest.mark.parametrize("flags", FLAG_VARIANTS)
def test_each_ablation_changes_the_computation(flags):
    static = _static()
    full = _opened(TemporalSAE.from_static(static))
    variant = TemporalSAE.from_static(static, **flags)
    own = variant.state_dict()
    skip_bridge = not variant.cfg.use_bridge
    shared = {k: v for k, v in full.state_dict().items()
              if k in own and own[k].shape == v.shape and not (skip_bridge and k.startswith("bridge."))}
    variant.load_state_dict(shared, strict=False)
    x = _x()
    a, b = full(x), variant(x)
    assert b.codes.shape == a.codes.shape and b.x_hat.shape == a.x_hat.shape
    if flags == dict(use_temporal_decoder=False):
        assert torch.equal(b.codes, a.codes)  # the encoder is untouched
    else:
        assert not torch.allclose(b.codes, a.codes)
    assert not torch.allclose(b.x_hat, a.x_hat)
    assert sum(p.numel() for p in variant.parameters()) <= sum(p.numel() for p in full.parameters())
    n_static = sum(p.numel() for p in variant.static_parameters())
    assert n_static == sum(p.numel() for p in static.parameters())
    assert n_static + sum(p.numel() for p in variant.temporal_parameters()) == sum(
        p.numel() for p in variant.parameters())


def test_save_load_roundtrip(tmp_path):
    model = _opened(TemporalSAE.from_static(_static(), window=4, lstm_hidden=8))
    model.set_coeffs({"gate_open": 0.75})
    model.save(tmp_path / "tsae")
    loaded = load_sae(tmp_path / "tsae")
    assert type(loaded) is TemporalSAE and loaded.cfg == model.cfg
    assert float(loaded.gate_open) == 0.75
    x = _x()
    a, b = model(x), loaded(x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.x_hat, b.x_hat)


def test_fold_input_scale():
    x = _x()
    for s, exact in [(4.0, True), (3.0, False)]:
        model = _opened(TemporalSAE.from_static(_static()))
        ref = model(s * x)
        model.fold_input_scale(s)
        out = model(x)
        if exact:  # a power of two commutes with every rounding
            assert torch.equal(out.codes, ref.codes) and torch.equal(out.x_hat * s, ref.x_hat)
        else:
            assert torch.equal(out.codes > 0, ref.codes > 0)
            assert torch.allclose(out.codes, ref.codes, rtol=1e-4, atol=1e-4)
            assert torch.allclose(out.x_hat * s, ref.x_hat, rtol=1e-4, atol=1e-4)


def test_coefficients_gate_k_distill_and_gate_penalty():
    model = _opened(TemporalSAE.from_static(_static()))
    x = _x()
    model.set_coeffs({"gate_open": 0.5, "k": 2})
    out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # set_coeffs was called: no re-run, even for a float64 gate
        model.set_coeffs({"gate_open": 1 / 3})
        model.loss_terms(x, model(x), {"gate_open": 1 / 3})
    model.set_coeffs({"gate_open": 0.5, "k": 2})
    terms = model.loss_terms(x, out, {"gate_open": 0.5, "k": 2, "distill": 1.0, "gate_l1": 0.1})
    assert float(terms["l0"]) <= 2 and 0 < float(terms["gate_mean"]) < 0.5
    assert float(terms["distill"].detach()) > 0
    expected = terms["mse"] + model.cfg.auxk * terms["auxk"] + terms["distill"] + 0.1 * terms["gate_l1"]
    assert torch.allclose(terms["loss"], expected)
    # a forward run with other coefficients is redone (with a warning) rather than silently used
    model.set_coeffs({"gate_open": 0.0})
    stale = model(x)
    with pytest.warns(UserWarning, match="set_coeffs"):
        redone = model.loss_terms(x, stale, {"gate_open": 0.5, "k": 2})
    assert torch.allclose(redone["mse"], terms["mse"]) and float(model.gate_open) == 0.5
    # closed gates: self-distillation and the gate penalty vanish; an external teacher is used if given
    model.set_coeffs({"gate_open": 0.0})
    closed = model(x)
    t = model.loss_terms(x, closed, {"gate_open": 0.0, "distill": 1.0, "gate_l1": 1.0})
    assert float(t["distill"].detach()) == 0 and float(t["gate_l1"]) == 0
    closed.aux["teacher_codes"] = torch.zeros_like(closed.codes)
    closed.aux["teacher_x_hat"] = torch.zeros_like(closed.x_hat)
    t = model.loss_terms(x, closed, {"gate_open": 0.0, "distill": 1.0})
    expected = closed.codes.pow(2).sum(-1).mean() + closed.x_hat.pow(2).sum(-1).mean()
    assert torch.allclose(t["distill"], expected)


def test_revive_dead_points_latents_at_worst_reconstructed_tokens():
    model = _opened(TemporalSAE.from_static(_static()))
    x = _x(B=4, T=16)
    model.train()
    model.loss_terms(x, model(x), {"gate_open": 1.0})
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[3, 10, 20]] = True
    residual = (x - model(x).x_hat).reshape(-1, D)
    residual = residual / residual.norm(dim=-1, keepdim=True)
    assert model.revive_dead(dead, x) == 3
    rows = model.W_dec[dead] / model.W_dec[dead].norm(dim=-1, keepdim=True)
    assert torch.allclose((rows @ residual.T).max(dim=1).values, torch.ones(3), atol=1e-5)
    enc_cols = model.W_enc[:, dead].T
    assert torch.allclose(enc_cols / enc_cols.norm(dim=-1, keepdim=True), rows, atol=1e-6)
    assert torch.all(model.bridge.lam[dead] == 0) and torch.all(model.b_enc[dead] == 0)
    assert torch.all(model.lifecycle.fire_count[dead] == 0)
    assert torch.all(model.activity.fire_count[dead] == 0)


def _follow_sequences(n, T, dictionary, g):
    """x_t = D[c_t] + 0.6 D[8 + c_{t-1}] + noise: the weak 'effect' feature is predicted by the past."""
    cause = torch.randint(0, 8, (n, T), generator=g)
    x = dictionary[cause].clone()
    x[:, 1:] += 0.6 * dictionary[8 + cause[:, :-1]]
    return x + 0.05 * torch.randn(x.shape, generator=g)


def test_training_the_temporal_path_beats_its_static_initialisation():
    g = torch.Generator().manual_seed(0)
    dictionary = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # orthonormal rows
    static = TopKSAE(TopKConfig(d_in=D, d_sae=D, k=1))
    with torch.no_grad():  # the ideal static SAE for this data: k=1 keeps the strong cause feature
        static.W_dec.copy_(dictionary)
        static.W_enc.copy_(dictionary.T)
    model = TemporalSAE.from_static(static, window=2, lstm_hidden=16).train()
    model.set_coeffs({"gate_open": 1.0})
    test_x = _follow_sequences(32, 16, dictionary, g)
    with torch.no_grad():
        static_mse = float(((static(test_x).x_hat - test_x) ** 2).sum(-1).mean())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        x = _follow_sequences(16, 16, dictionary, g)
        loss = model.loss_terms(x, model(x), {"gate_open": 1.0})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
    model.eval()
    with torch.no_grad():
        tsae_mse = float(((model(test_x).x_hat - test_x) ** 2).sum(-1).mean())
    assert static_mse > 0.3  # the effect feature (0.6^2 = 0.36 per token) is lost statically
    # measured: static 0.375, TSAE 0.208 (its decoder predicts the effect feature from the cause)
    assert tsae_mse < 0.6 * static_mse, (static_mse, tsae_mse)


@pytest.mark.parametrize("w", [1, 3, 4, 7, 16, 33])
def test_window_sum_is_exact_and_local(w):
    u = torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(w))
    ref = torch.stack([u[:, max(0, t - w + 1): t + 1].sum(1) for t in range(40)], 1)
    got = window_sum(u, w)
    assert torch.allclose(got, ref, atol=1e-5)
    u2 = u.clone()
    u2[:, :20] += 100.0  # everything at or before position 19 changes
    assert torch.equal(window_sum(u2, w)[:, 19 + w:], got[:, 19 + w:])  # windows that start later do not


def test_the_temporal_decoder_reconstructs_through_the_dictionary():
    model = _opened(TemporalSAE.from_static(_static(), window=4))
    with torch.no_grad():
        model.bridge.rho.fill_(1.0)
    x = _x()
    out = model(x)
    f, dec = out.codes, model.carry
    with torch.no_grad():  # c from its equation, outside the fused op (carry_coefficients.py)
        d = dec.memory(f).flatten(0, 1)
        r = torch.sigmoid(d @ dec.W_r + dec.b_r).view_as(f)
        p = torch.relu(d @ dec.W_p + dec.b_p).view_as(f)
        mu = torch.stack([f[:, max(0, t - 3): t + 1].sum(1) for t in range(f.shape[1])], 1) / 4
        c = torch.where(f > 0, 0.0, model.bridge.rho * (r * mu + p))
    assert torch.allclose(model.carried(f), c, atol=1e-5)
    assert torch.all(c[f > 0] == 0)  # a firing feature is not carried on top of itself
    assert (c > 0).any()
    assert torch.allclose(out.x_hat, (f + c) @ model.W_dec + model.b_dec, atol=1e-5)
    terms = model.loss_terms(x, out, {"gate_open": 1.0})
    assert float(terms["carried"]) > 0 and 0 < float(terms["carry_share"]) < 1


def test_sparse_ops_match_dense_values_and_gradients_at_the_nonzero_codes():
    g = torch.Generator().manual_seed(0)
    c = torch.relu(torch.randn(3, 9, 11, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    P = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    nz = c.detach() > 0
    dense_sum = torch.stack([c[:, max(0, t - 3): t + 1].sum(1) for t in range(9)], 1)  # w = 4
    for got, want in [(sparse_project(c, P), c @ P), (window_sum(c, 4), dense_sum)]:
        assert torch.allclose(got, want)
        w = torch.randn(want.shape, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((got * w).sum(), (c, P), allow_unused=True)
        gb = torch.autograd.grad((want * w).sum(), (c, P), allow_unused=True)
        assert torch.allclose(ga[0][nz], gb[0][nz]) and torch.all(ga[0][~nz] == 0)
        if gb[1] is not None:
            assert torch.allclose(ga[1], gb[1])


@pytest.mark.parametrize("w", [1, 3, 4, 12])
def test_fused_carry_coefficients_match_the_composed_ops(w):
    """carry_coefficients = f + gain * (sigma(l_r) * window_sum(f) / w + ReLU(l_p)) * 1[not f > 0],
    values and every gradient (float64; codes with zeros, a negative edited entry, w > T = 9)."""
    g = torch.Generator().manual_seed(w)
    B, T, n = 3, 9, 11

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    codes = torch.relu(rand(B, T, n) - 0.5)
    codes[0, 2, 3] = -0.7  # edited codes can be negative: they are not "firing", so they get a carry
    codes.requires_grad_()
    lr, lp = rand(B * T, n).requires_grad_(), rand(B * T, n).requires_grad_()
    gain = rand(n)
    gain[0] = 0.0
    gain.requires_grad_()
    inputs = (codes, lr, lp, gain)

    got = carry_coefficients(codes, lr, lp, gain, nonzero_flat(codes), w)
    c = (lr.sigmoid().view_as(codes) * window_sum(codes, w) / w + lp.relu().view_as(codes)) * gain
    want = codes + torch.where(codes > 0, 0.0, c)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[codes > 0], codes[codes > 0])
    weight = rand(B, T, n)
    grads = torch.autograd.grad((got * weight).sum(), inputs)
    refs = torch.autograd.grad((want * weight).sum(), inputs)
    for name, a, b in zip(("codes", "logits_r", "logits_p", "gain"), grads, refs, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
