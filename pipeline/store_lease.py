"""Build leases: the ``.build.lock`` of a store on S3 (or any S3-compatible server), where no flock exists.

The lease is the object ``<store>/.build.lock``, JSON ``{host, pid, token, ttl, expires_at}``.  Every
step is one conditional request, so the server, not the builders, decides every race:

- take:    ``PUT If-None-Match: *`` creates it only if absent: of any number of racing builders
           exactly one gets 200, the others 412; they read the lease and are refused while it lives.
- live:    a lease is *stale* once the server's clock (the ``Date`` of the GET that read it) is past
           ``Last-Modified + ttl`` (+1 s: both headers are whole seconds).  Both times are the
           server's, so the builders' clocks never enter (``expires_at`` is for people to read).
- renew:   the holder rewrites it every ttl/3 from a daemon thread with ``PUT If-Match: <its ETag>``.
           A 412 means it was taken over; no successful renewal for a whole ttl means it may have
           been.  Either way the lease is *lost* and `check` raises, so the writer stops writing.
- take over a stale lease (its holder died, `kill -9` included): ``PUT If-Match: <stale ETag>``.
           Of two takers that read the same stale lease exactly one matches; the other gets 412,
           rereads, finds a live lease and is refused.
- release: ``DELETE If-Match: <its ETag>`` on a clean exit (also at interpreter exit).

TTL: ``$TSAE_LEASE_TTL`` seconds (default 60).  Limits: docs/reliability.md ("Object stores").
"""

from __future__ import annotations

import atexit
import email.utils
import errno
import json
import os
import socket
import threading
import time
import uuid

from pipeline.errors import StoreError
from pipeline.store_layout import object_store_error

TTL_ENV = "TSAE_LEASE_TTL"
DEFAULT_TTL = 60.0
HEADER_RESOLUTION = 1.0  # Last-Modified and Date carry whole seconds
SCHEMES = ("s3://", "s3a://")


def is_lease_url(location) -> bool:
    """True for a location whose lock is a lease (an ``s3://`` URL)."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def default_ttl() -> float:
    text = os.environ.get(TTL_ENV, "")
    try:
        ttl = float(text) if text.strip() else DEFAULT_TTL
    except ValueError:
        ttl = -1.0
    if not 0 < ttl < float("inf"):
        raise StoreError(f"{TTL_ENV}={text!r} is not a positive number of seconds")
    return ttl


class Lease:
    """One process's claim on ``url`` (see module); `acquire`, then `check` before writes, `release`."""

    def __init__(self, url: str, message: str, ttl: float | None = None):
        import fsspec.core

        self.url, self.message = url, message
        self.ttl = default_ttl() if ttl is None else float(ttl)
        self.fs, path = fsspec.core.url_to_fs(url)
        self.bucket, self.key = self.fs.split_path(path)[:2]
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None  # why this process no longer holds it
        self._renewed = 0.0  # monotonic time of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------- requests
    def _put(self, **condition) -> str:
        """Write this process's lease body under ``condition``; its new ETag.  The renewal clock starts
        before the request, so the holder gives up (`check`) before the server can call it stale."""
        start, now = time.monotonic(), time.time()
        body = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        body.update(ttl=self.ttl, expires_at=round(now + self.ttl, 3))
        out = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=json.dumps(body), **condition
        )
        self._renewed = start
        return out["ETag"]

    def read(self) -> tuple[dict, str, float, float] | None:
        """``(body, etag, age, ttl)`` of the lease on the server (age and ttl in its clock), or None."""
        from fsspec.asyn import sync

        async def get():
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with r["Body"] as stream:
                return r, await stream.read()

        try:
            r, raw = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            body = json.loads(raw)
            ttl = float(body["ttl"])
        except (ValueError, TypeError, KeyError):  # not ours or damaged: it lives a default ttl
            body, ttl = {}, DEFAULT_TTL
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return body, r["ETag"], now - r["LastModified"].timestamp(), ttl

    # ---------------------------------------------------------------------------- protocol
    def acquire(self) -> Lease:
        """Create the lease or take over a stale one; StoreError(message + holder) if one lives."""
        for _ in range(5):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except FileExistsError:  # 412 If-None-Match: someone's lease is there
                pass
            except OSError as e:
                raise StoreError(f"cannot create the build lease {self.url}: {e}") from None
            except Exception as e:  # the S3 client's own errors (no server, no credentials)
                raise (object_store_error(e, self.url) or e) from None
            try:
                held = self.read()
            except OSError as e:
                raise StoreError(f"cannot read the build lease {self.url}: {e}") from None
            except Exception as e:  # the S3 client's own errors
                raise (object_store_error(e, self.url) or e) from None
            if held is None:
                continue  # released meanwhile: create again
            body, etag, age, ttl = held
            if body.get("token") == self.token:  # our own create, retried by the client after a timeout
                self.etag = etag
                break
            if age <= ttl + HEADER_RESOLUTION:
                who = f"pid {body.get('pid', '?')} on {body.get('host', '?')}"
                raise StoreError(f"{self.message} (lease held by {who}, renewed {max(age, 0):.0f} s ago)")
            try:
                self.etag = self._put(IfMatch=etag)  # take over: only one taker can match this ETag
                break
            except OSError as e:
                if e.errno != errno.EINVAL and not isinstance(e, FileNotFoundError):  # not a 412/404
                    raise StoreError(f"cannot take over the build lease {self.url}: {e}") from None
            except Exception as e:  # the S3 client's own errors
                raise (object_store_error(e, self.url) or e) from None
        else:
            raise StoreError(self.message)
        self._thread = threading.Thread(target=self._renew_loop, name="tsae-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:
                if isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == errno.EINVAL:  # 404/412
                    self.lost = "another process took it over"
                    return
                # unreachable for now: `check` calls it lost once a whole ttl passes unrenewed

    def check(self) -> None:
        """Raise StoreError if this process may no longer hold the lease (then it must stop writing)."""
        unrenewed = time.monotonic() - self._renewed
        if self.lost is None and unrenewed > self.ttl:
            self.lost = f"not renewed for {unrenewed:.0f} s (ttl {self.ttl:g} s)"
        if self.lost is not None:
            raise StoreError(
                f"lost the build lease of {self.url} ({self.lost}); stopped writing; "
                "rerun the same command to resume"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; a no-op the second time."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        atexit.unregister(self.release)
        if self.lost is None:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception:  # taken over or unreachable: a lease left behind goes stale after its ttl
                pass


def lease_is_live(url: str) -> bool:
    """True while a live (not stale) lease exists at ``url``."""
    held = Lease(url, "", ttl=DEFAULT_TTL).read()
    return held is not None and held[2] <= held[3] + HEADER_RESOLUTION
