"""Reading and writing the Sparse-Feature-Circuits contrast-pair format."""

from __future__ import annotations

import json

import pytest

from tsae.eval.probing import make_task, read_sfc, write_sfc
from tsae.eval.probing.sfc_format import SFCFormatError


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(tokenizer, tmp_path, suffix):
    items = make_task("coreference", tokenizer, n_test=40, n_train=20, seed=1)
    back = read_sfc(write_sfc(items, tmp_path / f"pairs{suffix}"))
    assert [b.prefix for b in back] == [a.prefix for a in items]
    for a, b in zip(items, back, strict=True):
        assert (b.label, b.label_name, b.correct, b.incorrect, b.split, b.template) == (
            a.label,
            a.label_name,
            a.correct,
            a.incorrect,
            a.split,
            a.template,
        )
        assert b.meta["patch_prefix"] == a.meta["patch_prefix"]
    text = (tmp_path / f"pairs{suffix}").read_text()
    assert text.startswith("[") == (suffix == ".json")


def test_reads_hand_written_sfc_jsonl(tmp_path):
    # SFC's own files: JSON Lines, no label column; agreement verbs give singular 0 / plural 1.
    rows = [
        {
            "clean_prefix": "The athlete that the managers like",
            "patch_prefix": "The athletes that the managers like",
            "clean_answer": " is",
            "patch_answer": " are",
            "case": "singular_plural",
        },
        {
            "clean_prefix": "The athletes that the manager likes",
            "patch_prefix": "The athlete that the manager likes",
            "clean_answer": " have",
            "patch_answer": " has",
            "case": "plural_singular",
        },
    ]
    path = tmp_path / "rc_test.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = read_sfc(path, task="agreement")
    assert [it.label for it in items] == [0, 1]
    assert items[1].correct == " have" and items[1].incorrect == " has"
    assert (
        items[0].meta["patch_prefix"] == rows[0]["patch_prefix"]
        and items[0].meta["case"] == "singular_plural"
    )
    assert all(it.split == "test" and it.task == "agreement" for it in items)


def test_labels_from_two_answers_or_mapping(tmp_path):
    rows = [
        {"clean_prefix": f"p{i}", "patch_prefix": f"q{i}", "clean_answer": a, "patch_answer": b}
        for i, (a, b) in enumerate([(" Mary", " John"), (" John", " Mary"), (" Mary", " John")])
    ]
    path = tmp_path / "names.json"
    path.write_text(json.dumps(rows))
    assert [it.label for it in read_sfc(path)] == [1, 0, 1]  # sorted: " John" 0, " Mary" 1
    assert [it.label for it in read_sfc(path, labels={" Mary": 0, " John": 1})] == [0, 1, 0]


def test_bad_files_fail_clearly(tmp_path):
    (tmp_path / "a.json").write_text('[{"clean_prefix": "x"}]')
    with pytest.raises(SFCFormatError, match="row 0 lacks patch_prefix"):
        read_sfc(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(SFCFormatError, match="not JSON"):
        read_sfc(tmp_path / "b.json")
    rows = [
        {"clean_prefix": "x", "patch_prefix": "y", "clean_answer": a, "patch_answer": " b"}
        for a in (" a", " c", " d")
    ]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    with pytest.raises(SFCFormatError, match="cannot tell the label"):
        read_sfc(tmp_path / "c.json")
