"""Edits of SAE codes through the model: exactly the outputs that should change, change."""

from __future__ import annotations

import pytest
import torch
from toys import IdentitySAE, PlantedSAE, tiny_bridge

from tsae.eval import interventions as iv

HOOK = "blocks.0.hook_resid_post"
T, T_ACTIVE = 16, 6


@pytest.fixture(scope="module")
def bridge():
    return tiny_bridge()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (3, T), generator=torch.Generator().manual_seed(0))


def planted(carry=0.0):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(2, 64, generator=g)
    V = V - V.mean(-1, keepdim=True)  # LayerNorm removes the mean direction
    return PlantedSAE(64, V, positions=[T_ACTIVE, -1], amp=3.0, carry=carry)  # latent 129: never active


def test_edits_set_the_right_codes():
    codes = torch.rand(2, 5, 4) + 0.1
    z = iv.zero_ablate([1], positions=2)(codes)
    assert z[:, 2, 1].eq(0).all() and torch.equal(z[:, [0, 1, 3, 4]], codes[:, [0, 1, 3, 4]])
    assert torch.equal(z[..., [0, 2, 3]], codes[..., [0, 2, 3]])
    m = iv.mean_ablate([0, 3], torch.arange(4.0))(codes)
    assert m[..., 0].eq(0).all() and m[..., 3].eq(3).all() and torch.equal(m[..., 1:3], codes[..., 1:3])
    c = iv.clamp([2], 7.0, positions=torch.tensor([1, 4]))(codes)
    assert c[0, 1, 2] == 7 and c[1, 4, 2] == 7 and (c != codes).sum() == 2
    src = torch.zeros_like(codes)
    p = iv.patch(None, src, positions=torch.tensor([[True, False, False, False, False]] * 2))(codes)
    assert p[:, 0].eq(0).all() and torch.equal(p[:, 1:], codes[:, 1:])


def test_ablation_changes_outputs_from_its_position_on_only(bridge, tokens):
    sae = planted()
    i = sae.cfg.d_sae - 2  # the planted latent, active only at T_ACTIVE
    eff = iv.edit_effect(bridge, tokens, HOOK, sae, iv.zero_ablate([i], positions=T_ACTIVE))
    assert eff["max_abs_dlogit"][:, :T_ACTIVE].eq(0).all() and eff["kl"][:, :T_ACTIVE].eq(0).all()
    assert (eff["kl"][:, T_ACTIVE] > 1e-4).all()
    assert (eff["max_abs_dlogit"][:, T_ACTIVE + 1:] > 0).all()  # attention carries it on
    # the same latent at a position where it is inactive, and a never-active latent: nothing moves
    for edit in (iv.zero_ablate([i], positions=T_ACTIVE + 2), iv.zero_ablate([i + 1])):
        e = iv.edit_effect(bridge, tokens, HOOK, sae, edit)
        assert e["max_abs_dlogit"].eq(0).all() and e["delta_ce"] == 0.0


def test_logit_diff_change_and_clamping(bridge, tokens):
    sae = IdentitySAE(64)
    pos, a, b = torch.full((3,), T - 1), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    eff = iv.edit_effect(bridge, tokens, HOOK, sae, iv.clamp([0, 1, 2], 5.0, positions=T - 1),
                         answers=(pos, a, b))
    assert eff["delta_logit_diff"].abs().min() > 0
    assert eff["kl"][:, :T - 1].eq(0).all()


def test_patching_codes_from_another_input(bridge, tokens):
    sae = IdentitySAE(64)
    same = iv.encode_tokens(bridge, tokens, HOOK, sae)
    assert iv.edit_effect(bridge, tokens, HOOK, sae, iv.patch(None, same))["max_abs_dlogit"].eq(0).all()
    other = iv.encode_tokens(bridge, tokens.roll(1, dims=0), HOOK, sae)
    eff = iv.edit_effect(bridge, tokens, HOOK, sae, iv.patch(None, other, positions=4))
    assert eff["kl"][:, :4].eq(0).all() and (eff["kl"][:, 4] > 1e-4).all()


@pytest.mark.parametrize("carry", [0.0, 0.5])
def test_temporal_reach_separates_decoder_carry_from_model_propagation(bridge, tokens, carry):
    sae = planted(carry)
    i = sae.cfg.d_sae - 2
    codes = sae.encode(torch.zeros(3, T, 64))
    sites = iv.active_sites(codes, i, n=10, k=4)
    assert sites[:, 1].eq(T_ACTIVE).all() and len(sites) == 3
    r = iv.temporal_reach(bridge, tokens, HOOK, sae, i, sites, k=4)
    assert r["max_abs_dlogit_before"] == 0.0
    assert r["kl"][0] > 0 and all(v > 0 for v in r["max_abs_dlogit"])
    dec = r["decoder_delta"]
    assert dec[0] == pytest.approx(3.0 * float(sae.V[0].norm()), rel=1e-5)
    if carry:
        assert dec[1] == pytest.approx(carry * dec[0], rel=1e-5) and dec[2] == 0.0
    else:
        assert dec[1:] == [0.0] * 4
