"""Pronoun resolution between two named candidates of different genders.

Templates (A, B: one female and one male name, order random; the pronoun's gender picks one):

    met      "A met B at the <place>. <Pron> <past> the <obj>. The <obj> was <participle> by"
    when     "When A visited B at the <place>, <pron> <past> the <obj>. The <obj> was <participle> by"
    who      "A and B were at the <place>. <Pron> <past> the <obj>. The person who <past> the <obj> was"
    because  "A called B from the <place> because <pron> <past> the <obj>.
              So the one who <past> the <obj> was"

Label = which candidate the pronoun refers to (0 = first mentioned, 1 = second mentioned).  The
antecedent's gender, hence the pronoun, is balanced within each label, so neither the pronoun alone
nor either name alone gives the label: it is the combination (name gender x pronoun gender) that
has to be resolved and carried to the decision point, the final "by"/"was", identical across labels.
correct/incorrect = " <antecedent name>" / " <other name>", single tokens.  `meta["patch_prefix"]`
swaps the pronoun, which swaps the antecedent (same token length).

Vocabulary split: names (per gender) and actions (verb + object) are disjoint between train and test;
places are shared.
"""

from __future__ import annotations

import random

from tsae.eval.probing import vocab
from tsae.eval.probing.items import ProbeItem, keep_single_tokens, make_split_items, split_vocab

TASK = "coreference"
TEMPLATES = {
    "met": "{A} met {B} at the {place}. {P} {past} the {obj}. The {obj} was {part} by",
    "when": "When {A} visited {B} at the {place}, {p} {past} the {obj}. The {obj} was {part} by",
    "who": "{A} and {B} were at the {place}. {P} {past} the {obj}. The person who {past} the {obj} was",
    "because": "{A} called {B} from the {place} because {p} {past} the {obj}. "
    "So the one who {past} the {obj} was",
}
LABEL_NAMES = ("first", "second")
PRONOUNS = {"female": "she", "male": "he"}


def coreference_vocab(tokenizer, seed: int = 0) -> dict:
    names = {}
    for gender, pool in (("female", vocab.FEMALE_NAMES), ("male", vocab.MALE_NAMES)):
        kept = keep_single_tokens(tokenizer, pool, lambda n: (" " + n,), f"{gender} names", 8)
        names[gender] = split_vocab(kept, seed)
    return {"names": names, "actions": split_vocab(vocab.ACTIONS, seed)}


def make_coreference(tokenizer, n_test: int = 1000, n_train: int = 2000, seed: int = 0) -> list[ProbeItem]:
    """Balanced coreference items: `n_test` test then `n_train` train, disjoint names and actions."""
    v = coreference_vocab(tokenizer, seed)

    def fill(template: str, a: str, b: str, pron: str, slots: dict) -> str:
        return TEMPLATES[template].format(A=a, B=b, P=pron.capitalize(), p=pron, **slots)

    def make(rng: random.Random, label: int, split: str) -> ProbeItem:
        template = rng.choice(list(TEMPLATES))
        gender_a = rng.choice(("female", "male"))
        gender_b = "male" if gender_a == "female" else "female"
        a = rng.choice(v["names"][gender_a][split])
        b = rng.choice(v["names"][gender_b][split])
        past, part, obj = rng.choice(v["actions"][split])
        slots = {"place": rng.choice(vocab.PLACES), "past": past, "part": part, "obj": obj}
        genders = (gender_a, gender_b)
        pron, other_pron = PRONOUNS[genders[label]], PRONOUNS[genders[1 - label]]
        names = (a, b)
        meta = {
            "first": a,
            "second": b,
            "pronoun": pron,
            "antecedent": names[label],
            "antecedent_gender": genders[label],
            "action": past,
            "object": obj,
            "place": slots["place"],
            "patch_prefix": fill(template, a, b, other_pron, slots),
        }
        return ProbeItem(
            TASK,
            template,
            fill(template, a, b, pron, slots),
            label,
            LABEL_NAMES[label],
            " " + names[label],
            " " + names[1 - label],
            split,
            meta,
        )

    return make_split_items(make, n_train=n_train, n_test=n_test, n_labels=2, seed=seed, task=TASK)
