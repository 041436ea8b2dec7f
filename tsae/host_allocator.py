"""Keep large freed CPU blocks in the process, so SAE temporaries do not page-fault on every step.

On CPU each [B*T, d_sae] temporary of a training step is tens of MB (4,096 tokens x 4,608 latents
in float32 = 75 MB).  glibc serves a request above its mmap threshold (dynamic, at most 32 MiB on
64-bit) with a fresh mmap and unmaps it on free; smaller heap tops are trimmed back to the OS as
soon as 128 KiB are free.  Either way the next temporary starts on pages the kernel must fault in
and zero, and that, not the arithmetic, dominated the element-wise passes: ~30 ms per pass over
75 MB, ~8 ms once the pages are reused.  Raising both thresholds lets freed blocks be reused from
the heap.  Measured on one core (bench/tsae_cost.py, F = 4,608, 4,096 tokens per step): a TopK
step 1,792 -> 1,478 ms, a TSAE step 4,062 -> 2,596 ms.  docs/performance.md has the trainer
figures and the memory cost.

The cost: memory the process frees is handed back to the OS only when more than TRIM_BYTES sits
free at the top of the heap, so the resident size stays near the step's peak between steps
instead of dropping; blocks of MMAP_BYTES or more are still mapped and unmapped.

A no-op where the C library is not glibc (macOS, musl), when the user has already tuned malloc
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or malloc tunables in GLIBC_TUNABLES, which win),
and with TSAE_RETAIN_FREED=0.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_BYTES = 1 << 30  # requests this large still get their own mapping
TRIM_BYTES = (1 << 31) - 1  # free heap top kept before trimming (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_applied: bool | None = None


def user_tuned_malloc() -> bool:
    env = os.environ
    return ("MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


def retain_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("TSAE_RETAIN_FREED", "1") == "0" or user_tuned_malloc():
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    except (OSError, AttributeError):
        _applied = False
    return _applied
