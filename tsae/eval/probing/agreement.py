"""Subject-verb agreement with attractors (after Linzen et al. 2016, Finlayson et al. 2021, Marks et al.).

Templates (the prefix stops right before the main verb):

    simple  "<Det> <N>"                          last token = the subject itself (a local control)
    pp      "<Det> <N> <Prep> the <N2>"          last token = the attractor noun
    rc      "<Det> <N> that the <N2> <Vpast>"    last token = the relative-clause verb

Label = number of the subject N (0 singular, 1 plural); the attractor N2's number is drawn
independently (balanced), so it is uninformative about the label.  correct/incorrect are the
singular/plural forms of a main verb (" is"/" are", " has"/" have", ...), both single tokens.  The
relative-clause verb is past tense, so it carries no number either.  In pp and rc items the label is
therefore not in the last token: a probe there measures subject number *carried forward* across the
attractor.  `meta["patch_prefix"]` flips the subject's number (same token length).

Vocabulary split: nouns (N and N2) and relative-clause verbs are disjoint between train and test.
Main verbs are only answers (never in the prefix) and are shared; determiners and prepositions too.
"""

from __future__ import annotations

import random

from tsae.eval.probing import vocab
from tsae.eval.probing.items import ProbeItem, keep_single_tokens, make_split_items, split_vocab

TASK = "agreement"
TEMPLATES = ("simple", "pp", "rc")
TEMPLATE_WEIGHTS = (0.2, 0.4, 0.4)  # the temporal templates dominate
LABEL_NAMES = ("singular", "plural")


def agreement_vocab(tokenizer, seed: int = 0) -> dict:
    nouns = keep_single_tokens(tokenizer, vocab.NOUNS, lambda p: (" " + p[0], " " + p[1]), "noun pairs", 8)
    verbs = keep_single_tokens(
        tokenizer, vocab.VERB_PAIRS, lambda p: (" " + p[0], " " + p[1]), "verb pairs", 2
    )
    rc_verbs = list(dict.fromkeys(vocab.RC_VERBS))
    return {"nouns": split_vocab(nouns, seed), "rc_verbs": split_vocab(rc_verbs, seed), "verbs": verbs}


def make_agreement(tokenizer, n_test: int = 1000, n_train: int = 2000, seed: int = 0) -> list[ProbeItem]:
    """Balanced agreement items: `n_test` test then `n_train` train, disjoint nouns and RC verbs."""
    v = agreement_vocab(tokenizer, seed)

    def make(rng: random.Random, label: int, split: str) -> ProbeItem:
        nouns = v["nouns"][split]
        template = rng.choices(TEMPLATES, TEMPLATE_WEIGHTS)[0]
        det = rng.choice(vocab.DETERMINERS)
        subj = rng.choice(nouns)
        sg, pl = rng.choice(v["verbs"])
        meta: dict = {"subject": subj[0], "determiner": det, "verb": sg}
        tail = ""
        if template != "simple":
            attr = rng.choice([n for n in nouns if n != subj])
            attr_number = rng.randrange(2)
            meta.update(
                attractor=attr[0],
                attractor_number=LABEL_NAMES[attr_number],
                attractor_matches=attr_number == label,
            )
            if template == "pp":
                prep = rng.choice(vocab.PREPOSITIONS)
                meta["preposition"] = prep
                tail = f" {prep} the {attr[attr_number]}"
            else:
                rc_verb = rng.choice(v["rc_verbs"][split])
                meta["rc_verb"] = rc_verb
                tail = f" that the {attr[attr_number]} {rc_verb}"
        prefix = f"{det} {subj[label]}{tail}"
        meta["patch_prefix"] = f"{det} {subj[1 - label]}{tail}"
        forms = (" " + sg, " " + pl)
        return ProbeItem(
            TASK, template, prefix, label, LABEL_NAMES[label], forms[label], forms[1 - label], split, meta
        )

    return make_split_items(make, n_train=n_train, n_test=n_test, n_labels=2, seed=seed, task=TASK)
