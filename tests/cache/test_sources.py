"""Text sources (embedded Shakespeare, local files, hub aliases offline) and sequence cutting."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pipeline import shakespeare
from pipeline.errors import SourceError
from pipeline.sequences import SequenceStats, iter_sequences
from pipeline.sources import Document, SourceWarning, iter_documents, source_fingerprint


@pytest.fixture(scope="module")
def plays():
    return list(iter_documents("shakespeare"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


# -- the embedded corpus ------------------------------------------------------------------------------
def test_all_38_plays_with_stable_ids(plays):
    assert len(plays) == 38
    assert [d.doc_id for d in plays] == list(range(38))
    assert len({d.name for d in plays}) == 38
    assert [(d.doc_id, d.name) for d in iter_documents("shakespeare", split="all")] == [
        (d.doc_id, d.name) for d in plays
    ]


def test_splits_are_disjoint_cover_all_and_keep_ids(plays):
    by_split = {s: list(iter_documents("shakespeare", split=s)) for s in ("train", "validation", "test")}
    names = {s: {d.name for d in docs} for s, docs in by_split.items()}
    assert [len(names[s]) for s in ("train", "validation", "test")] == [30, 4, 4]
    assert names["test"] == set(shakespeare.TEST_PLAYS)
    assert names["validation"] == set(shakespeare.VALIDATION_PLAYS)
    assert not (names["train"] & names["test"]) and not (names["train"] & names["validation"])
    assert set().union(*names.values()) == {d.name for d in plays}
    ids = {d.name: d.doc_id for d in plays}
    assert all(d.doc_id == ids[d.name] for docs in by_split.values() for d in docs)


def test_markdown_is_stripped_and_speech_kept(plays):
    for doc in plays:
        for char in "#*_\\":
            assert char not in doc.text, (doc.name, char)
        assert all(line == line.strip() for line in doc.text.splitlines())
        assert "\n\n\n" not in doc.text
    hamlet = next(d for d in plays if d.name == "hamlet")
    lines = hamlet.text.splitlines()
    assert lines[0] == "Hamlet"
    assert "SCENE I. Elsinore. A platform before the castle." in lines
    assert "FRANCISCO at his post. Enter to him BERNARDO" in lines
    assert lines.count("HAMLET") > 300  # speaker names stay, one line each
    assert "To be, or not to be: that is the question:" in lines
    aside = lines.index("A little more than kin, and less than kind.")
    assert lines[aside - 2 : aside] == ["HAMLET", "[Aside]"]


def test_play_text_on_each_markup_form():
    markdown = (
        "# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n**A**  \nWell,  \nsir.\n\n"
        "_\\[Aside]_  \nNo\\--more.\n\n\n\n*Exeunt.*\n"
    )
    assert shakespeare.play_text(markdown) == (
        "Title\n\nACT I\n\nSCENE I. A room.\n\nEnter A and\nB\n\n"
        "A\nWell,\nsir.\n\n[Aside]\nNo--more.\n\nExeunt.\n"
    )


def test_shakespeare_is_deterministic_and_fingerprinted(plays):
    assert list(iter_documents("shakespeare")) == plays
    train = source_fingerprint("shakespeare", "train")
    assert train == source_fingerprint("shakespeare", "train")
    assert len({train, source_fingerprint("shakespeare", "test"), source_fingerprint("shakespeare")}) == 3


def test_bad_source_arguments():
    with pytest.raises(SourceError, match="unknown split 'dev'"):
        iter_documents("shakespeare", split="dev")
    with pytest.raises(SourceError, match="no such file or folder"):
        iter_documents("./missing.txt")
    start = time.perf_counter()
    with pytest.raises(SourceError) as err:
        iter_documents("enwik8")
    assert time.perf_counter() - start < 2
    assert str(err.value) == (
        "dataset 'enwik8' needs the Hugging Face hub, which is unreachable (HF_HUB_OFFLINE=1); "
        "use --dataset shakespeare or a local file"
    )


# -- local files --------------------------------------------------------------------------------------
def test_local_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "b" / "rows.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(["row zero", "  ", "row two"]))
    )
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), tmp_path / "b" / "z.parquet")
    (tmp_path / "notes.md").write_text("ignored: not a supported suffix")

    docs = list(iter_documents(str(tmp_path)))
    assert [(d.doc_id, d.name, d.text) for d in docs] == [
        (0, "a.txt", "first document\nwith two lines\n"),  # one document per .txt file
        (1, "b/rows.jsonl:0", "row zero"),
        (3, "b/rows.jsonl:2", "row two"),  # the blank row is skipped, its id not reused
        (4, "b/z.parquet:0", "parquet one"),
        (5, "b/z.parquet:1", "parquet two"),
    ]
    assert [d.text for d in iter_documents(str(tmp_path / "b" / "z.parquet"))] == [
        "parquet one",
        "parquet two",
    ]
    many = tmp_path / "many.jsonl"
    many.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(60)))
    by_split = [{d.name for d in iter_documents(str(many), split=s)} for s in ("train", "validation", "test")]
    assert [len(names) > 0 for names in by_split] == [True, True, True]
    assert set().union(*by_split) == {d.name for d in iter_documents(str(many))}
    assert sum(map(len, by_split)) == 60  # disjoint

    before = source_fingerprint(str(tmp_path))
    (tmp_path / "a.txt").write_text("changed text\n")
    assert source_fingerprint(str(tmp_path)) != before
    with pytest.raises(SourceError, match="no column 'body'"):
        list(iter_documents(str(tmp_path / "b" / "rows.jsonl"), text_column="body"))


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.warns(SourceWarning, match=r"skipping .*latin1.txt: unreadable \(UnicodeDecodeError"):
        docs = list(iter_documents(str(tmp_path)))
    assert [d.name for d in docs] == ["good.txt"]
    with pytest.raises(SourceError, match=r"latin1.txt: unreadable"):
        list(iter_documents(str(tmp_path), on_bad_file="error"))
    with pytest.warns(SourceWarning), pytest.raises(SourceError, match="holds no usable text"):
        list(iter_documents(str(tmp_path / "latin1.txt")))


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="holds no .txt"):
        iter_documents(str(tmp_path))


# -- sequences ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_sequences_tile_each_document_without_crossing(plays, tokenizer, prepend_bos):
    docs = [d for d in plays if d.name in shakespeare.VALIDATION_PLAYS][:2]
    ctx = 64
    stats = SequenceStats()
    seqs = list(iter_sequences(docs, tokenizer, ctx, prepend_bos, stats=stats))
    body = ctx - 1 if prepend_bos else ctx
    assert all(s.tokens.dtype == np.int32 and s.tokens.shape == (ctx,) for s in seqs)
    assert all((s.tokens[0] == 1) == prepend_bos for s in seqs)

    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        mine = [s for s in seqs if s.doc_id == doc.doc_id]
        assert [s.doc_offset for s in mine] == list(range(0, len(ids) - body + 1, body))
        rebuilt = np.concatenate([s.tokens[ctx - body :] for s in mine])
        assert rebuilt.tolist() == ids[: len(rebuilt)]  # consecutive, in order, from this document only
        assert len(ids) - len(rebuilt) < body
    assert stats.n_sequences == len(seqs) and stats.n_tokens == ctx * len(seqs)
    assert stats.n_doc_tokens == stats.n_sequences * body + stats.n_tail_tokens_dropped
    assert (stats.n_docs, stats.n_docs_used, stats.n_docs_too_short) == (2, 2, 0)


def test_max_tokens_short_documents_and_errors(tokenizer):
    docs = [
        Document(0, "short", "Too short."),
        Document(1, "long", "word " * 200),
        Document(2, "longer", "more words " * 200),
    ]
    stats = SequenceStats()
    seqs = list(iter_sequences(docs, tokenizer, 32, True, max_tokens=5 * 32 + 31, stats=stats))
    assert len(seqs) == 5 and stats.n_tokens == 160 and stats.hit_max_tokens
    assert stats.n_docs_too_short == 1 and stats.n_short_doc_tokens_dropped > 0
    assert [s.doc_id for s in seqs] == [1] * 5

    with pytest.raises(SourceError, match="every document is shorter than one sequence of 32 tokens"):
        list(iter_sequences(docs[:1], tokenizer, 32, True))
    with pytest.raises(SourceError, match="max_tokens 10 is smaller than one sequence"):
        list(iter_sequences(docs, tokenizer, 32, True, max_tokens=10))


def test_sequences_are_deterministic(plays, tokenizer):
    docs = [d for d in plays if d.name in shakespeare.TEST_PLAYS]
    first = list(iter_sequences(iter(docs), tokenizer, 128, True, max_tokens=128 * 50))
    second = list(iter_sequences(iter(docs), tokenizer, 128, True, max_tokens=128 * 50))
    assert len(first) == 50
    assert all(
        np.array_equal(a.tokens, b.tokens) and a.doc_offset == b.doc_offset
        for a, b in zip(first, second, strict=True)
    )
