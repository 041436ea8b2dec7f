"""Read and write the Sparse-Feature-Circuits contrast-pair format.

A row is `{"clean_prefix", "patch_prefix", "clean_answer", "patch_answer"}`: the model should say
`clean_answer` after `clean_prefix` and `patch_answer` after `patch_prefix`.  Files are either one
JSON list of rows or JSON Lines (one row per line; the SFC repository's own `*.json` files are JSONL).

Mapping to a `ProbeItem`: prefix = clean_prefix, correct = clean_answer, incorrect = patch_answer,
meta["patch_prefix"] = patch_prefix.  The label comes from, in order: a row's own "label" field, the
`labels` argument (answer -> label), agreement verbs (singular 0 / plural 1), or, if the file has
exactly two distinct clean answers, their sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tsae.eval.probing import vocab
from tsae.eval.probing.items import ProbeItem

FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
_AGREEMENT_LABELS = {" " + form: number for pair in vocab.VERB_PAIRS for number, form in enumerate(pair)}


class SFCFormatError(ValueError):
    """A file that is not in the Sparse-Feature-Circuits row format."""


def item_to_row(item: ProbeItem) -> dict:
    if "patch_prefix" not in item.meta:
        raise SFCFormatError(f"item {item.prefix!r} has no meta['patch_prefix'] to export")
    return {
        "clean_prefix": item.prefix,
        "patch_prefix": item.meta["patch_prefix"],
        "clean_answer": item.correct,
        "patch_answer": item.incorrect,
        "label": item.label,
        "label_name": item.label_name,
        "template": item.template,
        "split": item.split,
    }


def write_sfc(items: Iterable[ProbeItem], path: str | Path, jsonl: bool | None = None) -> Path:
    """Write items as SFC rows; JSON Lines when `jsonl` (default: path ends in .jsonl), else a JSON list."""
    path = Path(path)
    rows = [item_to_row(it) for it in items]
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows, indent=1)
    path.write_text(text)
    return path


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise SFCFormatError(f"{path}: not JSON or JSON Lines ({e.msg}, line {e.lineno})") from None
    for i, row in enumerate(rows):
        missing = [f for f in FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise SFCFormatError(f"{path}: row {i} lacks {', '.join(missing)}")
    if not rows:
        raise SFCFormatError(f"{path}: no rows")
    return rows


def read_sfc(
    path: str | Path, task: str = "sfc", split: str = "test", labels: Mapping[str, int] | None = None
) -> list[ProbeItem]:
    """Load SFC rows as ProbeItems (see the module docstring for how labels are found)."""
    rows = read_rows(path)
    answers = sorted({r["clean_answer"] for r in rows})

    def label_of(row: dict) -> int:
        if "label" in row:
            return int(row["label"])
        if labels is not None and row["clean_answer"] in labels:
            return int(labels[row["clean_answer"]])
        if labels is None and row["clean_answer"] in _AGREEMENT_LABELS:
            return _AGREEMENT_LABELS[row["clean_answer"]]
        if labels is None and len(answers) == 2:
            return answers.index(row["clean_answer"])
        raise SFCFormatError(f"{path}: cannot tell the label of answer {row['clean_answer']!r}; pass labels=")

    items = []
    for row in rows:
        label = label_of(row)
        meta = {
            "patch_prefix": row["patch_prefix"],
            **{
                k: v for k, v in row.items() if k not in FIELDS + ("label", "label_name", "template", "split")
            },
        }
        items.append(
            ProbeItem(
                task,
                row.get("template", "sfc"),
                row["clean_prefix"],
                label,
                row.get("label_name", str(label)),
                row["clean_answer"],
                row["patch_answer"],
                row.get("split", split),
                meta,
            )
        )
    return items
