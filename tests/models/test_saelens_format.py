"""SAELens layout: folders written the way SAELens writes them load exactly; our export reloads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tsae.models import ReluL1SAE, TopKSAE
from tsae.models.registry import load_sae
from tsae.models.relu_l1 import ReluL1Config
from tsae.models.saelens_format import load_saelens, save_saelens
from tsae.models.topk import TopKConfig

D_IN, D_SAE = 12, 40


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / 3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 3,  # deliberately not unit norm
        "b_enc": torch.randn(D_SAE, generator=g) / 5,
        "b_dec": torch.randn(D_IN, generator=g),
    }


def _write(folder, cfg, weights):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def _cfg6(architecture, **extra):
    return {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.5.0", "model_name": "pythia-70m-deduped",
                         "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None}, **extra}


def _manual(w, x, *, k=None, apply_b_dec=True, rescale=False):
    """SAELens's inference maths written out per token."""
    outs = []
    for tok in x.reshape(-1, D_IN):
        sae_in = tok - w["b_dec"] if apply_b_dec else tok
        pre = w["W_enc"].T @ sae_in + w["b_enc"]
        norms = w["W_dec"].norm(dim=-1)
        if rescale:
            pre = pre * norms
        if k is None:
            f = pre.clamp(min=0)
        else:
            vals, idx = pre.topk(k)
            f = torch.zeros(D_SAE)
            f[idx] = vals.clamp(min=0)
        if rescale:
            f = f / norms
        outs.append(w["W_dec"].T @ f + w["b_dec"])
    return torch.stack(outs).reshape(x.shape)


def test_load_standard_matches_manual(tmp_path):
    w = _weights(0)
    folder = _write(tmp_path / "std", _cfg6("standard"), w)
    sae = load_saelens(folder)
    assert isinstance(sae, ReluL1SAE)
    assert (sae.cfg.hook_name, sae.cfg.hook_layer, sae.cfg.model_name) == (
        "blocks.3.hook_resid_post", 3, "pythia-70m-deduped")
    assert sae.cfg.unit_norm_decoder is False  # SAELens's decoder rows were not unit norm
    x = torch.randn(2, 5, D_IN)
    assert torch.allclose(sae(x).x_hat, _manual(w, x), atol=1e-5)


def test_load_topk_with_rescale_and_no_b_dec_on_input(tmp_path):
    w = _weights(1)
    cfg = _cfg6("topk", k=5, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    folder = _write(tmp_path / "topk", cfg, w)
    x = torch.randn(3, 4, D_IN)
    want = _manual(w, x, k=5, apply_b_dec=False, rescale=True)
    for sae in (load_saelens(folder), load_sae(folder)):  # the registry routes a SAELens topk folder too
        assert isinstance(sae, TopKSAE) and sae.cfg.k == 5
        assert torch.allclose(sae(x).x_hat, want, atol=1e-5)
        assert ((sae.encode(x) > 0).sum(-1) <= 5).all()


def test_load_pre6_topk_config(tmp_path):
    w = _weights(2)
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 7}, "hook_point": "blocks.1.hook_resid_pre", "hook_point_layer": 1,
           "model_name": "gpt2", "apply_b_dec_to_input": True, "normalize_activations": False,
           "sae_lens_training_version": "3.12.0"}
    sae = load_saelens(_write(tmp_path / "old", cfg, w))
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 7 and sae.cfg.hook_name == "blocks.1.hook_resid_pre"
    x = torch.randn(2, 3, D_IN)
    assert torch.allclose(sae(x).x_hat, _manual(w, x, k=7), atol=1e-5)


@pytest.mark.parametrize("cfg_patch, weights_patch, message", [
    ({"architecture": "jumprelu"}, {"threshold": torch.zeros(D_SAE)}, "'jumprelu' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, {}, "normalize_activations"),
    ({"reshape_activations": "hook_z"}, {}, "reshape_activations"),
    ({}, {"scaling_factor": torch.full((D_SAE,), 2.0)}, "expected weights"),
])
def test_unsupported_folders_refused(tmp_path, cfg_patch, weights_patch, message):
    folder = _write(tmp_path / "bad", {**_cfg6("standard"), **cfg_patch}, {**_weights(), **weights_patch})
    with pytest.raises(ValueError, match=message):
        load_saelens(folder)


@pytest.mark.parametrize("sae", [
    ReluL1SAE(ReluL1Config(d_in=D_IN, d_sae=D_SAE, hook_name="blocks.2.hook_resid_post", hook_layer=2)),
    TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=6, model_name="tiny")),
])
def test_save_saelens_reloads(tmp_path, sae):
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
    folder = save_saelens(sae, tmp_path / "export")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu_l1": "standard", "topk": "topk"}[sae.architecture]
    assert cfg["metadata"]["hook_name"] == sae.cfg.hook_name and cfg["apply_b_dec_to_input"] is True
    back = load_saelens(folder)
    assert type(back) is type(sae)
    x = torch.randn(2, 4, D_IN)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    # SAELens's own maths on the exported weights agrees as well.
    from safetensors.torch import load_file
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert set(w) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert torch.allclose(_manual(w, x, k=cfg.get("k")), sae(x).x_hat, atol=1e-5)
