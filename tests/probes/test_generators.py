"""The generated probing data: balanced, disjoint vocabularies, single-token answers, deterministic."""

from __future__ import annotations

import collections
import random

import pytest

from tsae.eval.probing import TASKS, ProbeItem, VocabularyError, by_split, make_task
from tsae.eval.probing.items import balanced_sample, is_single_token, n_tokens

N_TEST, N_TRAIN = 1000, 1000


@pytest.fixture(scope="module")
def datasets(tokenizer):
    return {t: make_task(t, tokenizer, n_test=N_TEST, n_train=N_TRAIN, seed=0) for t in TASKS}


# The words each task keeps apart between train and test.
VOCAB_KEYS = {
    "agreement": ("subject", "attractor", "rc_verb"),
    "coreference": ("first", "second", "action"),
    "disambiguation": ("homonym",),
}


@pytest.mark.parametrize("task", TASKS)
def test_sizes_and_balance(datasets, task):
    items = datasets[task]
    test, train = by_split(items, "test"), by_split(items, "train")
    assert len(test) >= 1000 and len(train) == N_TRAIN
    for part in (test, train):
        counts = collections.Counter(it.label for it in part)
        assert set(counts) == {0, 1}
        assert abs(counts[0] - counts[1]) <= 0.01 * len(part)
    assert len({it.prefix for it in items}) == len(items)  # no duplicate decision contexts
    assert all(it.task == task for it in items)


@pytest.mark.parametrize("task", TASKS)
def test_vocabulary_split_is_disjoint(datasets, task):
    items = datasets[task]
    for key in VOCAB_KEYS[task]:
        words = {s: {it.meta[key] for it in by_split(items, s) if key in it.meta} for s in ("train", "test")}
        assert words["train"] and words["test"]
        assert words["train"] & words["test"] == set(), key
    if task == "coreference":  # names in either role
        names = {
            s: {it.meta[r] for it in by_split(items, s) for r in ("first", "second")}
            for s in ("train", "test")
        }
        assert names["train"] & names["test"] == set()


@pytest.mark.parametrize("task", TASKS)
def test_answers_single_tokens_and_distinct(datasets, task, tokenizer):
    items = datasets[task]
    answers = {a for it in items for a in (it.correct, it.incorrect)}
    assert all(is_single_token(tokenizer, a) for a in answers)
    assert all(it.correct != it.incorrect for it in items)
    assert all(it.prefix != it.meta["patch_prefix"] for it in items)


def test_counterfactuals_align_and_flip(datasets, tokenizer):
    # agreement and coreference patches change one token in place; the answer flips with it.
    for task in ("agreement", "coreference"):
        for it in datasets[task][:200]:
            assert n_tokens(tokenizer, it.prefix) == n_tokens(tokenizer, it.meta["patch_prefix"])
    for it in datasets["agreement"][:200]:
        assert (
            it.prefix.split()[1] == it.meta["subject"]
            if it.label == 0
            else it.prefix.split()[1] != it.meta["subject"]
        )


def test_label_not_in_last_token_for_temporal_templates(datasets, tokenizer):
    """The decision-point token is one of a few, equally often for both labels."""
    for task in ("coreference", "disambiguation"):
        items = by_split(datasets[task], "test")
        last = {
            lab: collections.Counter(tokenizer.encode(it.prefix)[-1] for it in items if it.label == lab)
            for lab in (0, 1)
        }
        assert set(last[0]) == set(last[1]) and len(last[0]) <= 4
        for word in last[0]:
            p0, p1 = last[0][word] / sum(last[0].values()), last[1][word] / sum(last[1].values())
            assert abs(p0 - p1) < 0.1, (task, word, p0, p1)
    # agreement pp/rc: the last word is the attractor or the relative-clause verb, never the subject
    for it in datasets["agreement"]:
        if it.template != "simple":
            assert (
                it.prefix.split()[-1]
                in (it.meta.get("rc_verb"), it.meta["attractor"], it.meta["attractor"] + "s")
                or it.meta["attractor_number"] == "plural"
            )
            assert it.meta["subject"] not in it.prefix.split()[-1:]


def test_coreference_referent_position_independent_of_label(datasets):
    items = datasets["coreference"]
    for lab in (0, 1):
        sub = [it for it in items if it.label == lab]
        assert 0.45 < sum(it.meta["referent"] == "first" for it in sub) / len(sub) < 0.55
    for it in items:  # the distractor always has the other gender: the answer is never the only option
        assert it.meta["subject"] in it.prefix and it.meta["distractor"] in it.prefix


def test_attractor_number_independent_of_label(datasets):
    items = [it for it in datasets["agreement"] if "attractor_number" in it.meta]
    for lab in (0, 1):
        sub = [it for it in items if it.label == lab]
        frac_plural = sum(it.meta["attractor_number"] == "plural" for it in sub) / len(sub)
        assert 0.45 < frac_plural < 0.55


def test_disambiguation_answers_not_in_context():
    from tsae.eval.probing import vocab

    for h, senses in vocab.HOMONYMS.items():
        assert senses["natural"][0] != senses["artifact"][0], h
        for _, contexts in senses.values():
            for ctx in contexts:
                words = set(ctx.replace(",", " ").split())
                assert h not in words and not words & {senses[k][0] for k in senses}, (h, ctx)


def test_deterministic_by_seed(tokenizer):
    a = make_task("coreference", tokenizer, n_test=100, n_train=100, seed=3)
    b = make_task("coreference", tokenizer, n_test=100, n_train=100, seed=3)
    c = make_task("coreference", tokenizer, n_test=100, n_train=100, seed=4)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.prefix for x in a] != [x.prefix for x in c]


def test_context_split_and_errors(tokenizer):
    items = make_task("disambiguation", tokenizer, n_test=200, n_train=200, split_by="context")
    ctx = {s: {it.meta["context"] for it in by_split(items, s)} for s in ("train", "test")}
    assert ctx["train"] & ctx["test"] == set()
    homonyms = {s: {it.meta["homonym"] for it in by_split(items, s)} for s in ("train", "test")}
    assert homonyms["train"] == homonyms["test"]
    with pytest.raises(ValueError, match="unknown probing task"):
        make_task("ioi", tokenizer)
    with pytest.raises(VocabularyError, match="too small"):  # only 3 distinct prefixes per label exist
        balanced_sample(
            lambda rng, lab: ProbeItem("t", "x", f"{lab}{rng.randrange(3)}", lab, "", " a", " b", "test"),
            8,
            2,
            random.Random(0),
            patience=100,
        )


class _CharTokenizer:
    """Every character a token: no multi-character word survives the single-token filter."""

    def encode(self, text, add_special_tokens=False):
        return list(text)


def test_fails_clearly_when_vocabulary_does_not_survive():
    with pytest.raises(VocabularyError, match="single tokens"):
        make_task("agreement", _CharTokenizer(), n_test=10, n_train=10)
