"""The probing item and the helpers every task generator shares.

A `ProbeItem` is one minimal decision: `prefix` is the text up to the decision point.  A probe reads
the residual stream (or SAE codes) at the prefix's LAST token and predicts `label`; the behavioural
check compares the model's next-token logits of `correct` and `incorrect` (each one token, usually
with a leading space) at that same position.  `meta["patch_prefix"]` is the counterfactual prefix
whose correct answer is `incorrect` (Sparse-Feature-Circuits style), used by circuit faithfulness.

Generalisation is always tested on unseen words: generators split the *vocabulary* (nouns, names,
homonyms) into disjoint train and test sets, never just the items.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ProbeItem:
    task: str
    template: str
    prefix: str
    label: int
    label_name: str
    correct: str
    incorrect: str
    split: str  # "train" | "test"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeItem:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class VocabularyError(ValueError):
    """Too few words of a list survive the tokenizer filter to build the task."""


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def is_single_token(tokenizer, text: str) -> bool:
    return n_tokens(tokenizer, text) == 1


def keep_single_tokens(
    tokenizer, entries: Iterable, forms: Callable[[Any], Sequence[str]], what: str, minimum: int
) -> list:
    """Entries whose `forms(entry)` are all single tokens (deduplicated, in order); at least `minimum`."""
    kept, seen = [], set()
    for e in entries:
        if e in seen:
            continue
        seen.add(e)
        if all(is_single_token(tokenizer, f) for f in forms(e)):
            kept.append(e)
    if len(kept) < minimum:
        raise VocabularyError(
            f"only {len(kept)} {what} are single tokens in this tokenizer; the task needs at least {minimum}"
        )
    return kept


def split_vocab(words: Sequence, seed: int, test_frac: float = 0.5) -> dict[str, list]:
    """Shuffle a vocabulary with `seed` and cut it into disjoint {"train": [...], "test": [...]}."""
    words = list(words)
    random.Random(f"vocab-{seed}").shuffle(words)
    n_test = max(1, round(len(words) * test_frac))
    if n_test >= len(words):
        raise VocabularyError(f"cannot split {len(words)} words into non-empty train and test parts")
    return {"test": words[:n_test], "train": words[n_test:]}


def balanced_sample(
    make: Callable[[random.Random, int], ProbeItem | None],
    n: int,
    n_labels: int,
    rng: random.Random,
    patience: int = 2000,
) -> list[ProbeItem]:
    """Draw `n` items with distinct prefixes, exactly n/n_labels per label.

    `make(rng, label)` returns a random item with that label (or None to reject the draw).  Gives up
    after `patience` draws in a row that bring nothing new.  The result is interleaved label by label,
    so any prefix of it is balanced too.
    """
    if n % n_labels:
        raise ValueError(f"n={n} is not a multiple of the {n_labels} labels")
    per = n // n_labels
    by_label: list[list[ProbeItem]] = []
    seen: set[str] = set()
    for label in range(n_labels):
        got: list[ProbeItem] = []
        misses = 0
        while len(got) < per:
            item = make(rng, label)
            if item is None or item.prefix in seen:
                misses += 1
                if misses > patience:
                    raise VocabularyError(
                        f"could only draw {len(got)} distinct items of label {label}, need {per}; "
                        "the vocabulary is too small for this many items"
                    )
                continue
            misses = 0
            seen.add(item.prefix)
            got.append(item)
        by_label.append(got)
    return [by_label[label][i] for i in range(per) for label in range(n_labels)]


def make_split_items(
    make: Callable[[random.Random, int, str], ProbeItem | None],
    *,
    n_train: int,
    n_test: int,
    n_labels: int,
    seed: int,
    task: str,
) -> list[ProbeItem]:
    """Test items then train items, each drawn from its own vocabulary by `make(rng, label, split)`."""
    out: list[ProbeItem] = []
    for split, n in (("test", n_test), ("train", n_train)):
        rng = random.Random(f"{task}-{split}-{seed}")
        out += balanced_sample(lambda r, lab, s=split: make(r, lab, s), n, n_labels, rng)
    return out


def by_split(items: Iterable[ProbeItem], split: str) -> list[ProbeItem]:
    return [it for it in items if it.split == split]


def even(n: int, n_labels: int = 2) -> int:
    """Round n up to a multiple of the number of labels."""
    return -(-n // n_labels) * n_labels


@dataclass
class PrefixBatch:
    """Right-padded token ids of some items' prefixes; position `last[b]` is item b's decision point."""

    index: list[int]  # positions of these items in the list given to `prefix_batches`
    tokens: Any  # LongTensor [B, T]
    last: Any  # LongTensor [B]


def prefix_batches(
    tokenizer, items: Sequence[ProbeItem], batch_size: int = 32, bos_token_id: int | None = None
):
    """Yield `PrefixBatch`es of items grouped by token length (little padding).

    Padding goes on the right, after each item's decision point, so in a causal model (and a causal
    SAE) it cannot change anything at or before `last`; no attention mask is needed.
    """
    import torch

    ids = [tokenizer.encode(it.prefix, add_special_tokens=False) for it in items]
    if bos_token_id is not None:
        ids = [[bos_token_id, *x] for x in ids]
    order = sorted(range(len(items)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(ids[i]) for i in index)
        tokens = torch.zeros(len(index), width, dtype=torch.long)
        for row, i in enumerate(index):
            tokens[row, : len(ids[i])] = torch.tensor(ids[i])
        yield PrefixBatch(index, tokens, torch.tensor([len(ids[i]) - 1 for i in index]))
