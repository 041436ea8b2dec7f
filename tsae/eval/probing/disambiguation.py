"""Context-dependent word-sense disambiguation of homonyms.

Prefix = "<Intro> <sense context>, <pron> <verb> the <H>. <frame>", for example

    "After rowing slowly down the river, she noticed the bank. The bank is a kind of"   -> " land"
    "After depositing a paycheck, she noticed the bank. The bank is a kind of"           -> " business"

Only the earlier context fixes the sense: the homonym sentence and the frame are identical for both
senses, and the decision point (the frame's last token, "of") is too, so a probe there measures sense
information carried forward from the context through the homonym.
Label = the sense's kind, consistent across homonyms: 0 "natural" (animal, plant, place in nature,
body part, person) vs 1 "artifact" (made by people: tool, machine, institution, product).
correct/incorrect = the hypernym-like answer word of the right / other sense (single tokens).
`meta["patch_prefix"]` is the same item with a context of the other sense (lengths may differ;
`meta["patch_same_length"]` says whether the token counts match).

Vocabulary split (`split_by`): "homonym" (default) puts disjoint homonyms, with all their contexts
and answers, in train and test, so a probe must generalise the natural/artifact distinction to unseen
words; "context" keeps every homonym in both splits but with disjoint context phrases.
"""

from __future__ import annotations

import random

from tsae.eval.probing import vocab
from tsae.eval.probing.items import ProbeItem, VocabularyError, make_split_items, n_tokens, split_vocab

TASK = "disambiguation"
LABEL_NAMES = ("natural", "artifact")
PRONOUNS = ("she", "he", "they")


def disambiguation_vocab(tokenizer, seed: int = 0, split_by: str = "homonym") -> dict:
    """{split: {homonym: {sense: (answer, contexts)}}} restricted to single-token answers."""
    usable = {
        h: s
        for h, s in vocab.HOMONYMS.items()
        if all(n_tokens(tokenizer, " " + s[k][0]) == 1 for k in LABEL_NAMES)
    }
    if len(usable) < 4:
        raise VocabularyError(
            f"only {len(usable)} homonyms have single-token answers; the task needs at least 4"
        )
    if split_by == "homonym":
        parts = split_vocab(sorted(usable), seed)
        return {split: {h: usable[h] for h in hs} for split, hs in parts.items()}
    if split_by == "context":
        out: dict = {"train": {}, "test": {}}
        for h, senses in usable.items():
            for sense, (answer, contexts) in senses.items():
                parts = split_vocab(contexts, seed=seed, test_frac=1 / 3)
                for split in out:
                    out[split].setdefault(h, {})[sense] = (answer, tuple(parts[split]))
        return out
    raise ValueError(f"split_by must be 'homonym' or 'context', not {split_by!r}")


def make_disambiguation(
    tokenizer, n_test: int = 1000, n_train: int = 2000, seed: int = 0, split_by: str = "homonym"
) -> list[ProbeItem]:
    """Balanced natural/artifact items: `n_test` test then `n_train` train, disjoint homonyms/contexts."""
    v = disambiguation_vocab(tokenizer, seed, split_by)

    def prefix(intro: str, context: str, pron: str, verb: str, h: str, frame: str) -> str:
        return f"{intro} {context}, {pron} {verb} the {h}. " + frame.format(h=h)

    def make(rng: random.Random, label: int, split: str) -> ProbeItem:
        h = rng.choice(sorted(v[split]))
        senses = v[split][h]
        sense, other = LABEL_NAMES[label], LABEL_NAMES[1 - label]
        i = rng.randrange(len(senses[sense][1]))
        template = rng.choice(list(vocab.DISAMBIGUATION_FRAMES))
        frame = vocab.DISAMBIGUATION_FRAMES[template]
        slots = (rng.choice(vocab.CONTEXT_INTROS), rng.choice(PRONOUNS), rng.choice(vocab.HOMONYM_VERBS))
        intro, pron, verb = slots
        text = prefix(intro, senses[sense][1][i], pron, verb, h, frame)
        patch = prefix(intro, senses[other][1][i % len(senses[other][1])], pron, verb, h, frame)
        meta = {
            "homonym": h,
            "sense": sense,
            "context": senses[sense][1][i],
            "frame": frame,
            "patch_prefix": patch,
            "patch_same_length": n_tokens(tokenizer, text) == n_tokens(tokenizer, patch),
        }
        return ProbeItem(
            TASK,
            template,
            text,
            label,
            sense,
            " " + senses[sense][0],
            " " + senses[other][0],
            split,
            meta,
        )

    return make_split_items(make, n_train=n_train, n_test=n_test, n_labels=2, seed=seed, task=TASK)
