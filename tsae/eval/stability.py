"""Temporal stability of SAE codes, with the controls that make it interpretable.

Codes f [B, T, F] >= 0 of whole sequences; A_t = {i : f_{t,i} > 0} the active set at position t.  Only
positions >= skip are evaluated; "adjacent pairs" are (t-1, t) with both positions evaluated.

Temporal stability score (the headline)
    TSS = mean over adjacent pairs with A_t u A_{t-1} non-empty of  |A_t n A_{t-1}| / |A_t u A_{t-1}|
Jaccard overlap of consecutive active sets, in [0, 1].  Chosen over magnitude-based measures because
it depends only on which latents fire, so it compares SAEs whose code scales differ (TopK vs ReLU,
folded input scales) and reads directly as "the fraction of the active set that carries over".  Its
chance level rises with L0, so it is always reported next to its controls:

  * shuffled input (`tss_shuffled`): each sequence's positions >= skip are permuted (one uniform
    permutation per sequence, seeded), the permuted *residual sequence* is encoded by the same SAE, and
    TSS is measured along the permuted order.  For a static SAE this equals shuffling the codes; for
    a temporal SAE it also removes the temporal context the encoder relies on, so TSS - tss_shuffled
    is the stability the SAE extracts from real temporal order.
  * shuffled codes (`tss_shuffled_codes`): the unshuffled codes, permuted the same way after
    encoding; the chance level of TSS for these exact marginal firing statistics.
  * tss_kappa = (TSS - tss_shuffled_codes) / (1 - tss_shuffled_codes), a chance-corrected TSS
    (0: no more persistent than chance, 1: identical consecutive active sets).
  * input stability: mean cosine of adjacent residual vectors cos(x_t, x_{t-1}), raw and centred on
    the eval-set mean mu (cos(x_t - mu, x_{t-1} - mu); raw cosines of the residual stream are
    dominated by its large common mean), and the same on the shuffled sequence.

Magnitude-aware companion: code_similarity = 1 - sum ||f_t - f_{t-1}||_1 / sum (||f_t||_1 + ||f_{t-1}||_1).

Smoothness scores of the T-SAE paper (Bhalla et al. 2025), pooled over sequences and latents:
    tv_per_token     = sum_t ||f_t - f_{t-1}||_1 / #pairs                   (lower is smoother)
    fft_hf_lf        = sum P(k) over K/2 < k <= K  /  sum P(k) over 1 <= k <= K/2, P = |rfft_t f|^2
                       per sequence and latent, K = n // 2 (DC excluded)   (white noise ~1)
    var_ratio_1_8    = Var(f_{t+1} - f_t) / Var(f_{t+8} - f_t)              (white noise 1; <1 smooth)
    haar_detail_approx = sum d^2 / sum a^2, one-level Haar on pairs (t, t+1) from the first position
                       of f minus its per-sequence, per-latent mean (no DC, as in fft_hf_lf):
                       a = (f_t + f_{t+1}) / sqrt 2, d = (f_t - f_{t+1}) / sqrt 2   (white noise ~1)
    lipschitz_max / _mean = max / mean over adjacent pairs of ||f_t - f_{t-1}||_2 / ||x_t - x_{t-1}||_2

Temporal metrics of the temporal-crosscoder paper: for lags k in (1, 2, 4, 8), with a_t = [f_t > 0]
per latent, the mutual information I(a_t; a_{t+k}) in bits from the 2x2 table pooled over all pairs
(t, t+k), averaged over latents that are neither never- nor always-active; mi_norm = I / H(a_t)
(the uncertainty coefficient, in [0, 1]).  Run lengths, bursts, duty cycle and single-token latents
are in `tsae.eval.lifetimes`.

Everything is accumulated as sums, so arbitrarily many batches stream through.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LAGS = (1, 2, 4, 8)


def shuffle_index(B: int, T: int, skip: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Index [B, T]: a uniform random permutation of positions skip..T-1 per row, identity before skip."""
    keys = torch.rand(B, T - skip, generator=generator)
    idx = keys.argsort(dim=1) + skip
    head = torch.arange(skip).expand(B, skip)
    return torch.cat([head, idx], dim=1)


def gather_positions(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, ...] reordered along T by idx [B, T]."""
    idx = idx.to(x.device)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def jaccard_pairs(active: Tensor) -> tuple[Tensor, Tensor]:
    """Per adjacent pair: (|A_t n A_{t-1}|, |A_t u A_{t-1}|), each [B, T-1]."""
    a, b = active[:, 1:], active[:, :-1]
    return (a & b).sum(-1), (a | b).sum(-1)


def tss(codes: Tensor) -> float:
    """The temporal stability score of one batch of codes [B, T, F] (all positions evaluated)."""
    inter, union = jaccard_pairs(codes > 0)
    keep = union > 0
    return float((inter[keep] / union[keep]).mean()) if keep.any() else float("nan")


def _mi_bits(n11: Tensor, na: Tensor, nb: Tensor, n: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per latent (MI in bits, H(a) in bits, defined-mask) from the 2x2 table counts."""
    pa, pb, p11 = na / n, nb / n, n11 / n
    cells = [(p11, pa, pb), (pa - p11, pa, 1 - pb), (pb - p11, 1 - pa, pb),
             (1 - pa - pb + p11, 1 - pa, 1 - pb)]  # (p(a, b), p(a), p(b)) for the four cells
    mi = torch.zeros_like(pa)
    for pj, p1, p2 in cells:
        term = pj * torch.log2(pj / (p1 * p2))
        mi = mi + torch.where(pj > 0, term, torch.zeros_like(term))
    ha = -(pa * torch.log2(pa) + (1 - pa) * torch.log2(1 - pa))
    ok = (pa > 0) & (pa < 1) & (pb > 0) & (pb < 1)
    return mi.clamp(min=0), ha, ok


class CodeTemporalStats:
    """Streaming sums for TSS, code similarity, smoothness and lagged MI of one code stream."""

    def __init__(self, d_sae: int, lags: tuple[int, ...] = LAGS):
        self.lags = lags
        self.s: dict[str, float] = {}
        self.lip_max = 0.0
        self.mi = {k: [torch.zeros(d_sae, dtype=torch.float64) for _ in range(3)] for k in lags}
        self.mi_n = dict.fromkeys(lags, 0.0)

    def _add(self, key: str, value) -> None:
        self.s[key] = self.s.get(key, 0.0) + float(value)

    @torch.no_grad()
    def update(self, codes: Tensor, x: Tensor | None = None, skip: int = 0) -> None:
        f = codes[:, skip:].float()
        active = f > 0
        B, T, F = f.shape
        if T < 2:
            return
        inter, union = jaccard_pairs(active)
        keep = union > 0
        self._add("jac_sum", (inter[keep] / union[keep]).sum())
        self._add("jac_n", keep.sum())
        df = f[:, 1:] - f[:, :-1]
        self._add("tv", df.abs().sum())
        self._add("l1_pairs", f[:, 1:].sum() + f[:, :-1].sum())
        self._add("pairs", B * (T - 1))
        if x is not None:
            dx = (x[:, skip + 1:] - x[:, skip:-1]).float().norm(dim=-1)
            ok = dx > 1e-6 * x[:, skip:].float().norm(dim=-1).mean().clamp(min=1e-12)
            ratio = df.norm(dim=-1)[ok] / dx[ok]
            if ratio.numel():
                self._add("lip_sum", ratio.sum())
                self._add("lip_n", ratio.numel())
                self.lip_max = max(self.lip_max, float(ratio.max()))
        if T >= 4:
            power = torch.fft.rfft(f, dim=1).abs().pow(2)  # [B, T//2+1, F]
            K = T // 2
            self._add("fft_lo", power[:, 1:K // 2 + 1].sum())
            self._add("fft_hi", power[:, K // 2 + 1:K + 1].sum())
        for lag, key in ((1, "d1"), (8, "d8")):
            if T > 8:
                d = f[:, lag:] - f[:, :-lag]
                self._add(key + "_s", d.sum())
                self._add(key + "_s2", d.pow(2).sum())
                self._add(key + "_n", d.numel())
        n2 = (T // 2) * 2
        fc = f[:, :n2] - f[:, :n2].mean(1, keepdim=True)  # DC removed, as in the FFT ratio
        a, b = fc[:, 0::2], fc[:, 1::2]
        self._add("haar_d", (a - b).pow(2).sum() / 2)
        self._add("haar_a", (a + b).pow(2).sum() / 2)
        for k in self.lags:
            if T > k:
                first, second = active[:, :-k], active[:, k:]
                n11, na, nb = self.mi[k]
                n11 += (first & second).sum((0, 1)).double().cpu()
                na += first.sum((0, 1)).double().cpu()
                nb += second.sum((0, 1)).double().cpu()
                self.mi_n[k] += B * (T - k)

    def _ratio(self, num: str, den: str) -> float:
        d = self.s.get(den, 0.0)
        return self.s.get(num, 0.0) / d if d > 0 else float("nan")

    def _var(self, key: str) -> float:
        n = self.s.get(key + "_n", 0.0)
        if n == 0:
            return float("nan")
        return self.s[key + "_s2"] / n - (self.s[key + "_s"] / n) ** 2

    def result(self) -> dict[str, float]:
        v1, v8 = self._var("d1"), self._var("d8")
        out = {
            "tss": self._ratio("jac_sum", "jac_n"),
            "code_similarity": 1.0 - self._ratio("tv", "l1_pairs"),
            "tv_per_token": self._ratio("tv", "pairs"),
            "fft_hf_lf": self._ratio("fft_hi", "fft_lo"),
            "var_ratio_1_8": v1 / v8 if v8 > 0 else float("nan"),
            "haar_detail_approx": self._ratio("haar_d", "haar_a"),
            "lipschitz_mean": self._ratio("lip_sum", "lip_n"),
            "lipschitz_max": self.lip_max if self.s.get("lip_n") else float("nan"),
        }
        for k in self.lags:
            n = self.mi_n[k]
            mi, ha, ok = _mi_bits(*self.mi[k], n) if n > 0 else (None, None, torch.zeros(1, dtype=torch.bool))
            out[f"mi_bits_lag{k}"] = float(mi[ok].mean()) if ok.any() else float("nan")
            out[f"mi_norm_lag{k}"] = float((mi[ok] / ha[ok]).mean()) if ok.any() else float("nan")
        return out


class InputStats:
    """Mean cosine of adjacent residual vectors, raw and centred on `mean` (first batch's mean if None)."""

    def __init__(self, mean: Tensor | None = None):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.s = {"cos": 0.0, "cos_centered": 0.0, "n": 0.0}

    @torch.no_grad()
    def update(self, x: Tensor, skip: int = 0) -> None:
        x = x[:, skip:].float()
        if x.shape[1] < 2:
            return
        if self.mean is None:
            self.mean = x.reshape(-1, x.shape[-1]).mean(0).cpu()
        cos = torch.nn.functional.cosine_similarity
        xc = x - self.mean.to(x.device)
        self.s["cos"] += float(cos(x[:, 1:], x[:, :-1], dim=-1, eps=1e-12).sum())
        self.s["cos_centered"] += float(cos(xc[:, 1:], xc[:, :-1], dim=-1, eps=1e-12).sum())
        self.s["n"] += x.shape[0] * (x.shape[1] - 1)

    def result(self) -> dict[str, float]:
        n = self.s["n"] or float("nan")
        return {"input_cos": self.s["cos"] / n, "input_cos_centered": self.s["cos_centered"] / n}


class StabilityEval:
    """TSS, smoothness and MI of one SAE's codes, with the shuffled-position and input controls.

    `update(x, codes, encode)`: x [B, T, d] the residuals, codes = encode(x) (already computed by the
    caller), `encode` the SAE's encoder, used once more on the position-shuffled residuals.
    """

    def __init__(self, d_sae: int, *, lags: tuple[int, ...] = LAGS, input_mean: Tensor | None = None,
                 seed: int = 0):
        self.codes = CodeTemporalStats(d_sae, lags)
        self.shuffled_input = CodeTemporalStats(d_sae, lags)
        self.shuffled_codes = CodeTemporalStats(d_sae, lags)
        self.input = InputStats(input_mean)
        self.input_shuffled = InputStats(input_mean)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor, encode: Callable[[Tensor], Tensor] | None,
               skip: int = 0) -> None:
        B, T = x.shape[:2]
        idx = shuffle_index(B, T, skip, self.generator)
        x_perm = gather_positions(x, idx)
        self.codes.update(codes, x, skip)
        self.shuffled_codes.update(gather_positions(codes, idx), x_perm, skip)
        if encode is not None:
            self.shuffled_input.update(encode(x_perm), x_perm, skip)
        self.input.update(x, skip)
        if self.input_shuffled.mean is None:
            self.input_shuffled.mean = self.input.mean
        self.input_shuffled.update(x_perm, skip)

    def result(self) -> dict[str, float | dict[str, float]]:
        main = self.codes.result()
        sh_in, sh_codes = self.shuffled_input.result(), self.shuffled_codes.result()
        inp, inp_sh = self.input.result(), self.input_shuffled.result()
        chance = sh_codes["tss"]
        return {
            "tss": main["tss"],
            "tss_shuffled": sh_in["tss"],
            "tss_shuffled_codes": chance,
            "tss_excess": main["tss"] - sh_in["tss"],
            "tss_kappa": (main["tss"] - chance) / (1 - chance) if chance < 1 else float("nan"),
            **inp,
            "input_cos_shuffled": inp_sh["input_cos"],
            "input_cos_centered_shuffled": inp_sh["input_cos_centered"],
            "codes": main,
            "shuffled_input": sh_in,
            "shuffled_codes": sh_codes,
        }
