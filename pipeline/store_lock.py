"""Locks on local stores: an exclusive, non-blocking ``flock`` that the OS releases when its holder
dies, so a crashed build never leaves a key locked.  A second process is refused at once with one
clear line rather than left waiting.  Object stores have no locks (docs/distributed.md).

- ``<store>/.build.lock``: the builder (the single-process writer, or rank 0 of a distributed
  build); `repair` and `rm` take it too, so they refuse while a build runs.
- ``<store>/.build.lock.<r>``: worker r of a distributed build, so a share is never computed twice
  at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store_layout import LOCK_FILE


def try_lock(path: Path, message: str) -> int:
    """Take the exclusive lock on ``path`` (created if needed) and return its descriptor; raise
    ``StoreError(message)`` if another process holds it.  `unlock` (or the holder's death) frees it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(message) from None
    return fd


def is_held(path: Path) -> bool:
    """True while some process holds the lock on ``path`` (False if the file does not exist)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock this call took


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def lock_builder(location) -> int | None:
    """The builder's lock of a local store (its folder created if needed); None for a URL store."""
    if not isinstance(location, Path):
        return None
    try:
        location.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create store {location}: {e.strerror or e}") from None
    return try_lock(location / LOCK_FILE, f"another process is building {location}; wait for it or stop it")
