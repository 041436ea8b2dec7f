"""A build on a really full (small) filesystem: one-line error, completed chunks kept, resumes once
space is freed.  Needs a private mount namespace (root, or unprivileged user namespaces) to mount a
small tmpfs; without one it is skipped, and `tests/cache/test_store_integrity.py` plus the
``enospc`` trials of `test_cache_crash.py` cover the same path with ENOSPC injected at zarr's writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def namespace_prefix(mnt: Path) -> list[str] | None:
    """``unshare`` arguments under which mounting a tmpfs works here, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{mnt}'"], capture_output=True
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_build_into_a_full_tmpfs_stops_keeps_chunks_and_resumes(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    prefix = namespace_prefix(small)
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or user namespaces)")
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from cache_faults import disk_full_scenario; "
        f"print(json.dumps(disk_full_scenario({str(small)!r}, {str(tmp_path)!r})))"
    )
    script = f"mount -t tmpfs -o size=2m tmpfs '{small}' && exec '{sys.executable}' -c \"{code}\""
    p = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["fs_bytes"] == 2 * 2**20  # the build really ran on the 2 MiB tmpfs
    lines = r["full_stderr"].strip().splitlines()
    assert r["full_exit"] == 2 and not r["traceback"] and len(lines) == 1, r["full_stderr"]
    assert lines[0].startswith("error: disk full while ") and "rerun the same command to resume" in lines[0]
    assert 0 < r["kept_chunks"] < 12 and r["interrupted_problems"] == []
    # the count in the message is what the manifest on disk names, i.e. what a resume keeps
    assert f"the {r['kept_chunks']} completed chunks are kept" in lines[0]
    assert r["resume_exit"] == 0 and r["resume"]["resumed_seqs"] == 8 * r["kept_chunks"]
    assert r["differences"] == [] and r["partial_files"] == 0
