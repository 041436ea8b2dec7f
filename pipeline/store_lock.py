"""Locks on stores, so a crashed build never leaves a key locked and a second process is refused at once
with one clear line rather than left waiting.

- A local store: an exclusive, non-blocking ``flock`` that the OS releases when its holder dies.
- A store on S3 (``s3://``): a lease object renewed by its holder, which a builder may take over once
  its holder stopped renewing it for a ttl (`pipeline.store_lease`).  Other URLs (``memory://``,
  ``gs://``) have no lock (docs/distributed.md).

- ``<store>/.build.lock``: the builder (the single-process writer, or rank 0 of a distributed
  build); `repair` and `rm` take it too, so they refuse while a build runs.
- ``<store>/.build.lock.<r>``: worker r of a distributed build on a local disk, so a share is never
  computed twice at once.

A lock is an ``int`` (a descriptor), a `Lease`, or None (no lock); `unlock` and `check_held` take any.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store_layout import LOCK_FILE, join
from pipeline.store_lease import Lease, is_lease_url, lease_is_live


def try_lock(path, message: str) -> int | Lease:
    """Take the exclusive lock on ``path`` (created if needed) and return it; raise
    ``StoreError(message)`` if another process holds it.  `unlock` (or the holder's death) frees it."""
    if is_lease_url(path):
        return Lease(path, message).acquire()
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


def is_held(path) -> bool:
    """True while some process holds the lock on ``path`` (False if the file does not exist)."""
    if is_lease_url(path):
        return lease_is_live(path)
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


def unlock(lock: int | Lease | None) -> None:
    if isinstance(lock, Lease):
        lock.release()
    elif lock is not None:
        os.close(lock)  # closing the descriptor releases the flock


def check_held(lock: int | Lease | None) -> None:
    """Raise StoreError if ``lock`` is a lease this process lost (a flock cannot be lost)."""
    if isinstance(lock, Lease):
        lock.check()


def lock_builder(location) -> int | Lease | None:
    """The builder's lock of a store: a flock on a local store (its folder created if needed), a
    lease on an ``s3://`` store, None for other URLs."""
    message = f"another process is building {location}; wait for it or stop it"
    if is_lease_url(location):
        return try_lock(join(location, LOCK_FILE), message)
    if not isinstance(location, Path):
        return None
    try:
        location.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create store {location}: {e.strerror or e}") from None
    return try_lock(location / LOCK_FILE, message)
