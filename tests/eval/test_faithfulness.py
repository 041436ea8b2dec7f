"""Attribution patching and circuit faithfulness on a toy whose logit difference rides one latent."""

from __future__ import annotations

import pytest
import torch
from toys import tiny_bridge

from tsae.eval import hooking
from tsae.eval.faithfulness import TaskBatch, attribution_scores, faithfulness_curve, reference_means
from tsae.eval.interventions import logit_diff
from tsae.models.base import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"  # the last block: F at position p depends on x_p alone
N, T, K = 16, 10, 7


class ToySAE(SAE):
    """Latent 0 fires (value a) only at the decision position and decodes to v; latents 1..K fire
    everywhere (ReLU(x W + 1)) and decode to directions orthogonal to every item's dF/dx_p."""

    architecture = "test_attr_toy"

    def __init__(self, v, W_enc, W_dec, p, a=4.0):
        super().__init__(SAEConfig(d_in=64, d_sae=1 + K))
        self.v, self.W_enc, self.W_dec = (torch.nn.Parameter(t) for t in (v, W_enc, W_dec))
        self.p, self.a = p, a

    def encode(self, x):
        first = torch.zeros(*x.shape[:2], 1, dtype=x.dtype)
        first[:, self.p] = self.a
        return torch.cat([first, (x @ self.W_enc + 1).relu()], -1)

    def decode(self, c):
        return c[..., :1] * self.v + c[..., 1:] @ self.W_dec


@pytest.fixture(scope="module")
def toy():
    bridge = tiny_bridge()
    g = torch.Generator().manual_seed(0)
    task = TaskBatch(tokens=torch.randint(0, 97, (N, T), generator=g), position=torch.full((N,), T - 1),
                     correct=torch.full((N,), 5), incorrect=torch.full((N,), 11))
    state = {}

    def grab(x):
        state["x"] = x.detach().clone().requires_grad_(True)
        return state["x"]

    logits = hooking.forward(bridge, task.tokens, HOOK, grab)
    logit_diff(logits, *task.answers()).sum().backward()
    G = state["x"].grad[:, T - 1]  # [N, 64]: dF/dx_p for every item
    v = G.mean(0) / G.mean(0).norm() * 0.5
    basis, _ = torch.linalg.qr(torch.cat([G, v[None]]).T)  # orthonormal basis of span{G, v}
    W_dec = torch.randn(K, 64, generator=g)
    W_dec = W_dec - (W_dec @ basis) @ basis.T
    W_enc = torch.randn(64, K, generator=g) / 8
    return bridge, task, ToySAE(v, W_enc, W_dec, p=T - 1)


def test_attribution_ranks_the_planted_latent_first(toy):
    bridge, task, sae = toy
    mean_codes, _ = reference_means(bridge, task, HOOK, sae)
    assert mean_codes[0] == pytest.approx(sae.a / T)
    scores = attribution_scores(bridge, task, HOOK, sae, mean_codes, batch_size=5)
    assert int(scores.abs().argmax()) == 0 and scores[0] > 0
    assert scores[1:].abs().max() < 1e-3 * scores[0]


def test_faithfulness_curve_runs_from_zero_to_one(toy):
    bridge, task, sae = toy
    res = faithfulness_curve(bridge, task, HOOK, sae, sizes=(1, 2, 5), batch_size=8)
    assert res["sizes"] == [0, 1, 2, 5, 1 + K]
    assert res["top_features"][0] == 0
    f = res["faithfulness"]
    assert f[0] == 0.0 and f[-1] == pytest.approx(1.0, abs=1e-5)
    assert f[1] > 0.9  # the one planted latent carries (almost) all of F
    # with the error term mean-ablated too, the full set no longer reproduces the model
    fe = res["faithfulness_error_mean"]
    assert fe[0] == 0.0 and abs(fe[-1] - 1.0) > 1e-3
