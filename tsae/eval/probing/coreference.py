"""Coreference: choosing the pronoun that refers back to the current subject, with a distractor.

Templates (A, B: one female and one male name, order random; X is A or B, drawn independently):

    because   "A met B at the <place>. Later, X <past> the <obj> because"
    and_then  "A and B were at the <place>. X <past> the <obj>, and then"
    after     "A called B from the <place>. After X <past> the <obj>,"
    said      "When A visited B at the <place>, X <past> the <obj> and said that"

The next word is a pronoun for X: correct/incorrect = " she"/" he" (or the reverse).
Label = gender of the referent X (0 female, 1 male).  Both genders are always in the context (the
distractor is the other candidate), so "is there a female name" does not give the label: a probe must
read the gender of *the clause's subject*, a name 4-7 tokens before the decision point, carried past
the verb and object.  The decision point (the template's last token) is identical for both labels,
and whether X is the first or second mentioned candidate is balanced within each label
(`meta["referent"]`).  `meta["patch_prefix"]` makes the other candidate the subject, which flips the
answer (same token length: names are single tokens).

An earlier design asked the reverse question ("<Pron> washed the shirt. The shirt was washed by" ->
name); SmolLM2-135M answers it at chance, always choosing the most recent name, so its behavioural
check was uninformative (see docs/probes.md).

Vocabulary split: names (per gender) and actions (verb + object) are disjoint between train and
test; places are shared.
"""

from __future__ import annotations

import random

from tsae.eval.probing import vocab
from tsae.eval.probing.items import ProbeItem, keep_single_tokens, make_split_items, split_vocab

TASK = "coreference"
TEMPLATES = {
    "because": "{A} met {B} at the {place}. Later, {X} {past} the {obj} because",
    "and_then": "{A} and {B} were at the {place}. {X} {past} the {obj}, and then",
    "after": "{A} called {B} from the {place}. After {X} {past} the {obj},",
    "said": "When {A} visited {B} at the {place}, {X} {past} the {obj} and said that",
}
LABEL_NAMES = ("female", "male")
PRONOUNS = (" she", " he")
REFERENTS = ("first", "second")


def coreference_vocab(tokenizer, seed: int = 0) -> dict:
    names = {}
    for gender, pool in zip(LABEL_NAMES, (vocab.FEMALE_NAMES, vocab.MALE_NAMES), strict=True):
        kept = keep_single_tokens(tokenizer, pool, lambda n: (" " + n,), f"{gender} names", 8)
        names[gender] = split_vocab(kept, seed)
    keep_single_tokens(tokenizer, PRONOUNS, lambda p: (p,), "pronouns", 2)
    return {"names": names, "actions": split_vocab(vocab.ACTIONS, seed)}


def make_coreference(tokenizer, n_test: int = 1000, n_train: int = 2000, seed: int = 0) -> list[ProbeItem]:
    """Balanced coreference items: `n_test` test then `n_train` train, disjoint names and actions."""
    v = coreference_vocab(tokenizer, seed)

    def make(rng: random.Random, label: int, split: str) -> ProbeItem:
        template = rng.choice(list(TEMPLATES))
        referent = rng.randrange(2)  # X is the first (0) or second (1) mentioned candidate
        genders = [LABEL_NAMES[1 - label]] * 2
        genders[referent] = LABEL_NAMES[label]  # the distractor has the other gender
        a, b = (rng.choice(v["names"][g][split]) for g in genders)
        past, obj = rng.choice(v["actions"][split])
        slots = {"A": a, "B": b, "place": rng.choice(vocab.PLACES), "past": past, "obj": obj}
        names = (a, b)
        prefix = TEMPLATES[template].format(X=names[referent], **slots)
        meta = {
            "first": a,
            "second": b,
            "referent": REFERENTS[referent],
            "subject": names[referent],
            "distractor": names[1 - referent],
            "action": past,
            "object": obj,
            "place": slots["place"],
            "patch_prefix": TEMPLATES[template].format(X=names[1 - referent], **slots),
        }
        return ProbeItem(
            TASK,
            template,
            prefix,
            label,
            LABEL_NAMES[label],
            PRONOUNS[label],
            PRONOUNS[1 - label],
            split,
            meta,
        )

    return make_split_items(make, n_train=n_train, n_test=n_test, n_labels=2, seed=seed, task=TASK)
