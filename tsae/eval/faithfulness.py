"""Which latents carry a task's decision: attribution patching and circuit faithfulness.

A task item is a prefix whose next token decides between `correct` and `incorrect`; the metric is the
logit difference at the decision position p (the prefix's last token):

    F = logit(correct) - logit(incorrect)        at position p, averaged over items

The SAE sits at one hook with its error term (x' = decode(c) + e, e = x - decode(c)), so the model is
unchanged and every latent is a node.  Baseline codes m [F] = the mean code over a reference set (every
evaluated position of the task's own prefixes, by default): "mean ablation" replaces c_{t,i} by m_i.

Attribution patching (a first-order estimate of each latent's indirect effect, Syed et al. 2023 /
Marks et al. 2024), summed over positions and averaged over items:

    score_i = mean_items sum_t  dF/dc_{t,i}  (c_{t,i} - m_i)

one forward and one backward per batch, gradients through the decoder with e held fixed.  Latents are
ranked by |score_i| (a latent that pushes F down is as much part of the mechanism as one that pushes
it up).

Faithfulness (Marks et al. 2024): the circuit C = the top-|C| latents, kept at their clean codes at
every position; every latent outside C is mean-ablated at every position.  Then

    faithfulness(C) = (F(C) - F(empty)) / (F(model) - F(empty))

F(model) is the clean model; F(empty) has every latent mean-ablated.  The error term is a node too:

    error="keep"   e is kept (always in the circuit): faithfulness(all latents) = 1 exactly,
                   and the curve measures how few latents reproduce the SAE's share of F;
    error="mean"   e is replaced by its mean over the reference set (outside the circuit, ablated like
                   any node): faithfulness(all latents) < 1 shows how much of F lives in the error.

Reported as curves over |C| in `sizes` (plus the empty and the full set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tsae.eval import hooking
from tsae.eval.interventions import logit_diff

SIZES = (1, 2, 5, 10, 20, 50, 100)


@dataclass
class TaskBatch:
    tokens: Tensor  # long [N, T], right-padded
    position: Tensor  # long [N], the decision position (last prefix token)
    correct: Tensor  # long [N]
    incorrect: Tensor  # long [N]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int, device=None) -> TaskBatch:
        parts = (self.tokens, self.position, self.correct, self.incorrect)
        return TaskBatch(*(t[start:stop].to(device) for t in parts))

    def answers(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.position, self.correct, self.incorrect

    def evaluated(self, skip: int) -> Tensor:
        """Bool [N, T]: positions skip..p of each row (the prefix, after the skipped head)."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :]
        return (t >= skip) & (t <= self.position[:, None].to(t.device))


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer {text!r} is {len(ids)} tokens; the logit difference needs one")
    return ids[0]


def encode_items(tokenizer, items, *, bos_token_id: int | None = None) -> TaskBatch:
    """Probe items (`tsae.eval.probing.ProbeItem`) as one right-padded TaskBatch, tokenised exactly as
    the probes tokenise them (`prefix_batches`: prefix without special tokens, BOS optionally first)."""
    from tsae.eval.probing.items import prefix_batches

    (b,) = prefix_batches(tokenizer, items, batch_size=len(items), bos_token_id=bos_token_id)
    order = [items[i] for i in b.index]  # sorted by length
    return TaskBatch(
        tokens=b.tokens,
        position=b.last,
        correct=torch.tensor([single_token(tokenizer, it.correct) for it in order]),
        incorrect=torch.tensor([single_token(tokenizer, it.incorrect) for it in order]),
    )


def _chunks(model, task: TaskBatch, batch_size: int):
    device = hooking.model_device(model)
    for start in range(0, len(task), batch_size):
        yield task.rows(start, start + batch_size, device)


@torch.no_grad()
def reference_means(model, task: TaskBatch, hook: str, sae, *, skip: int = 0,
                    batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """(mean code m [F], mean error term [d]) over the evaluated positions of `task`."""
    code_sum = err_sum = None
    n = 0
    for b in _chunks(model, task, batch_size):
        cap: dict[str, Tensor] = {}
        hooking.forward(model, b.tokens, hook, capture=cap)
        x = cap["x"].to(hooking.sae_dtype(sae))
        codes = sae.encode(x)
        err = x - sae.decode(codes)
        keep = b.evaluated(skip)
        cs, es = codes[keep].double().sum(0), err[keep].double().sum(0)
        code_sum = cs if code_sum is None else code_sum + cs
        err_sum = es if err_sum is None else err_sum + es
        n += int(keep.sum())
    return (code_sum / n).float(), (err_sum / n).float()


def attribution_scores(model, task: TaskBatch, hook: str, sae, baseline: Tensor, *, skip: int = 0,
                       batch_size: int = 16) -> Tensor:
    """score_i = mean_items sum_t dF/dc_{t,i} (c_{t,i} - baseline_i), float [F] (see module doc)."""
    total = None
    for b in _chunks(model, task, batch_size):
        state: dict[str, Tensor] = {}

        def replace(x: Tensor, state=state) -> Tensor:
            xs = x.to(hooking.sae_dtype(sae))
            with torch.no_grad():
                codes = sae.encode(xs)
                err = xs - sae.decode(codes)
            leaf = codes.clone().requires_grad_(True)
            state["codes"], state["leaf"] = codes, leaf
            return hooking.keep_prefix(xs, sae.decode(leaf) + err, skip)

        with torch.enable_grad():
            logits = hooking.forward(model, b.tokens, hook, replace)
            logit_diff(logits.float(), *b.answers()).sum().backward()
        leaf, codes = state["leaf"], state["codes"]
        keep = b.evaluated(skip)[..., None]
        s = (leaf.grad * (codes - baseline.to(codes)) * keep).double().sum((0, 1))
        total = s if total is None else total + s
    return (total / len(task)).float()


@torch.no_grad()
def mean_logit_diff(model, task: TaskBatch, hook: str | None = None, sae=None, keep: Tensor | None = None,
                    baseline: Tensor | None = None, error: Tensor | None = None, *, skip: int = 0,
                    batch_size: int = 32) -> float:
    """Mean F.  With an SAE: latents outside bool `keep` [F] take `baseline`; the error term is
    x - decode(c) when `error` is None, else the given constant [d] (the mean-ablated error)."""
    total = 0.0
    for b in _chunks(model, task, batch_size):
        if sae is None:
            logits = hooking.bridge_of(model)(b.tokens, return_type="logits")
        else:
            logits = hooking.forward(model, b.tokens, hook, _circuit(sae, keep, baseline, error, skip))
        total += float(logit_diff(logits.float(), *b.answers()).double().sum())
    return total / len(task)


def _circuit(sae, keep: Tensor, baseline: Tensor, error: Tensor | None, skip: int):
    def replace(x: Tensor) -> Tensor:
        xs = x.to(hooking.sae_dtype(sae))
        codes = sae.encode(xs)
        kept = torch.where(keep.to(codes.device), codes, baseline.to(codes))
        err = xs - sae.decode(codes) if error is None else error.to(xs)
        return hooking.keep_prefix(xs, sae.decode(kept) + err, skip)

    return replace


def faithfulness_curve(model, task: TaskBatch, hook: str, sae, *, sizes=SIZES, skip: int = 0,
                       error_modes: tuple[str, ...] = ("keep", "mean"), batch_size: int = 16,
                       reference: TaskBatch | None = None) -> dict:
    """Attribution ranking and faithfulness curves (see module doc) for one SAE on one task."""
    mean_codes, mean_err = reference_means(model, reference or task, hook, sae, skip=skip,
                                           batch_size=batch_size)
    scores = attribution_scores(model, task, hook, sae, mean_codes, skip=skip, batch_size=batch_size)
    order = scores.abs().argsort(descending=True)
    F = scores.numel()
    ns = [0] + sorted({int(n) for n in sizes if 0 < n < F}) + [F]
    f_model = mean_logit_diff(model, task, batch_size=batch_size)
    out = {
        "f_model": f_model,
        "sizes": ns,
        "top_features": order[:max(ns[1:-1] or [1])].tolist(),
        "top_scores": scores[order[:max(ns[1:-1] or [1])]].tolist(),
    }
    for mode in error_modes:
        err = None if mode == "keep" else mean_err
        f_c = []
        for n in ns:
            keep = torch.zeros(F, dtype=torch.bool)
            keep[order[:n]] = True
            f_c.append(mean_logit_diff(model, task, hook, sae, keep, mean_codes, err, skip=skip,
                                       batch_size=batch_size))
        denom = f_model - f_c[0]
        key = "faithfulness" if mode == "keep" else f"faithfulness_error_{mode}"
        out[key] = [(f - f_c[0]) / denom + 0.0 if denom != 0 else float("nan") for f in f_c]
        out[f"f_circuit_error_{mode}"] = f_c
    return out
