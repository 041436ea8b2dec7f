"""Shared matplotlib setup for every analysis figure.

Figures are built with the object API (`matplotlib.figure.Figure`, rendered by Agg when saved), never
with pyplot, so plotting works headless and never switches the backend of a notebook that imports
us.  Every figure function runs under `styled` (one rc style for the project) and ends in
`save_png`, which writes a PNG and returns its path.  `is_png` checks the 8-byte PNG signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "image.cmap": "viridis",
}

# One colour per model name, stable across figures (tab10 order, assigned on first use).
_PALETTE = matplotlib.colormaps["tab10"].colors
_model_colors: dict[str, tuple] = {}


def model_color(name: str) -> tuple:
    if name not in _model_colors:
        _model_colors[name] = _PALETTE[len(_model_colors) % len(_PALETTE)]
    return _model_colors[name]


def styled(fn: Callable) -> Callable:
    """Run a figure function under the project style (rc params are read when artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], squeeze: bool = False,
               **subplot_kw) -> tuple[Figure, object]:
    """A pyplot-free figure with a grid of axes (a 2-d array unless squeeze)."""
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplot_kw)
    return fig, axes


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG to `path` (parents created) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are saved as .png, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def is_png(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(len(PNG_MAGIC)) == PNG_MAGIC


def tex_safe(text: str, max_len: int = 14) -> str:
    """A token or label made safe for matplotlib text: no mathtext ($), visible newlines/tabs, truncated."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text.replace("$", r"\$")
