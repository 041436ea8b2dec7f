"""Can the model do the task?  The behavioural check of a probing task.

For each item, at the prefix's last token, the margin is

    m = logit(correct) - logit(incorrect)      (next-token logits; one token each)

and the item is solved when m > 0.  Accuracy comes with a Wilson 95% interval and a one-sided
binomial test against chance (0.5): a task the model cannot do is reported as `above_chance=False`,
not hidden.  A probe on a task the model fails still says what the representation carries, but not
what the model *uses*.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from tsae.eval.probing.items import ProbeItem, prefix_batches

ALPHA = 0.01  # significance level of the above-chance test


def bos_id(model, prepend_bos: bool) -> int | None:
    return model.bos_token_id if prepend_bos else None


@torch.no_grad()
def logit_margins(
    model, items: Sequence[ProbeItem], batch_size: int = 32, prepend_bos: bool = True
) -> np.ndarray:
    """logit(correct) - logit(incorrect) at each item's decision point, in item order ([n] float)."""
    tok = model.tokenizer
    answers = torch.tensor([[_one_token(tok, it.correct), _one_token(tok, it.incorrect)] for it in items])
    out = np.empty(len(items), dtype=np.float64)
    for batch in prefix_batches(tok, items, batch_size, bos_id(model, prepend_bos)):
        logits = model.forward_logits(batch.tokens)  # [B, T, V]
        last = logits[torch.arange(len(batch.index)), batch.last.to(logits.device)].float().cpu()  # [B, V]
        pair = last.gather(1, answers[batch.index])  # [B, 2]
        out[batch.index] = (pair[:, 0] - pair[:, 1]).numpy()
    return out


def behavioural_accuracy(
    model, items: Sequence[ProbeItem], batch_size: int = 32, prepend_bos: bool = True
) -> dict:
    """{accuracy, n, ci95, p_value, above_chance, mean_margin, per_template: {template: {accuracy, n}}}."""
    if not items:
        raise ValueError("no items to check")
    margins = logit_margins(model, items, batch_size, prepend_bos)
    solved = margins > 0
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, ok in zip(items, solved, strict=True):
        groups[it.template].append(bool(ok))
    k, n = int(solved.sum()), len(items)
    p = binomial_p_greater(k, n)
    return {
        "accuracy": k / n,
        "n": n,
        "ci95": wilson_interval(k, n),
        "p_value": p,
        "above_chance": p < ALPHA,
        "mean_margin": float(margins.mean()),
        "per_template": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())},
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_p_greater(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the one-sided p-value of doing better than chance."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, 0.5))


def _one_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"answer {text!r} is {len(ids)} tokens in this tokenizer; answers must be single tokens"
        )
    return ids[0]
