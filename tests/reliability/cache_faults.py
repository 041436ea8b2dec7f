"""Fault injection for the activation cache, shared by `test_cache_crash.py` and `bench/soak_cache.py`.

A `Rig` holds the tiny model, loaded once, and a reference store built without faults.  Each fault
kind runs real builds (or repairs) of the same key in forked processes that run the real CLI
(`forked_cli`), injects its fault, then finishes the work in this process and checks the outcome
against the reference (`store_compare`).  While a Rig is open torch runs on one thread in this
process (`close()` restores the count): forks must inherit one thread (see `forked_cli`), and one
thread everywhere keeps the children's activations bit-equal to the reference and the resumes.

- ``kill9``: SIGKILL the build at a random instant (uniform over a build's duration), ``kills``
  times in a row (each later kill hits a resuming build); then resume to the end.
- ``sigint``: Ctrl-C at a random instant: exit 130 with one ``error: interrupted`` line (or 0 when
  it finished first); then resume.
- ``enospc``: the disk fills at a random file write (every write from the k-th on fails with
  ENOSPC, chunk files, manifest and metadata alike): exit 2 with one ``error: disk full`` line; then
  space is freed and the build resumed.
- ``corrupt``: 1-3 random chunk files of a complete store are bit-flipped, truncated or deleted:
  `verify` must name exactly those chunks, reads of them must raise `StoreError` (reads of the
  others must succeed), and `repair` (optionally SIGKILLed once at a random instant first) must
  restore the reference.

After every fault the interrupted store's completed chunks are checked (`verify`), and the resume
must keep every sequence the manifest had recorded.  ``lost`` counts sequences lost that way plus
sequences that differ from the reference at the end: it must be 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from forked_cli import Child, cli_args, fork_cli
from store_compare import TINY, chunk_file, differences, refusals, snapshot, wrong_seqs

from pipeline import paths
from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.store_layout import array_names
from pipeline.verify import verify_store

KINDS = ("kill9", "sigint", "enospc", "corrupt", "race")


@dataclass
class Trial:
    kind: str
    faults: Counter = field(default_factory=Counter)  # landed faults by sub-kind (a late kill is none)
    lost: int = 0  # sequences lost or wrong (must be 0)
    failures: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Rig:
    """The tiny model, a reference store, and fault trials against fresh copies of its key."""

    def __init__(self, model, root: Path, slow_s: float = 0.02, calibrate: bool = True):
        self.model, self.root, self.slow_s = model, Path(root), slow_s
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = 0
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # before any build: forks must inherit one thread (module doc)
        try:
            ref = build_cache(self.config(self._home("reference")), model=model)
            self.key, self.ref_location = ref.key, Path(ref.location)
            self.reference = snapshot(self.ref_location)
            self.n_seq = ref.n_seq
            self.build_s, self.n_puts = self._calibrate() if calibrate else (1.0, 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give this process back its torch thread count."""
        torch.set_num_threads(self._threads)

    # -------------------------------------------------------------------------------- helpers
    def config(self, home: Path) -> CacheConfig:
        return CacheConfig(**TINY, cache_dir=str(home))

    def _home(self, name: str) -> Path:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        models = home / "models"
        if not models.exists():  # share converted models and weight-hash memos
            models.symlink_to(paths.models_dir(), target_is_directory=True)
        return home

    def fresh(self) -> Path:
        self._n += 1
        return self._home(f"t{self._n:03d}")

    def start(self, args: list[str], *, slow: bool = True, fault: tuple | None = None) -> Child:
        self._n += 1
        log = self.root / f"child{self._n:03d}.log"
        return fork_cli(args, self.model, log, self.slow_s if slow else 0.0, fault)

    def _calibrate(self) -> tuple[float, int]:
        """Seconds of one slowed child build, and the file writes of one build (for ENOSPC)."""
        import zarr.storage._local as local

        home = self.fresh()
        child = self.start(cli_args(self.config(home)))
        code = child.stop(None, 0)
        if code != 0:
            raise RuntimeError(f"calibration build failed ({code}): {child.text()[-500:]}")
        seconds = time.perf_counter() - child.started
        problems = differences(self.reference, home / self.key)
        if problems:
            raise RuntimeError(f"a forked build differs from the in-process one: {problems[:3]}")
        real_put, count = local._put, [0]

        def put(path, value, exclusive=False):
            count[0] += 1
            return real_put(path, value, exclusive=exclusive)

        local._put = put
        try:
            build_cache(self.config(self.fresh()), model=self.model)
        finally:
            local._put = real_put
        return seconds, count[0]

    def resume(self, home: Path, trial: Trial, kept_seqs: int) -> None:
        """Finish the build in this process; it must keep the ``kept_seqs`` sequences recorded
        before the fault and end equal to the reference."""
        r = build_cache(self.config(home), model=self.model)
        if not r.hit and r.resumed_seqs < kept_seqs:
            trial.lost += kept_seqs - r.resumed_seqs
            trial.failures.append(f"resume kept {r.resumed_seqs} of {kept_seqs} recorded sequences")
        trial.events.append("resume: hit" if r.hit else f"resume after {r.resumed_seqs} sequences")
        self.final_check(home, trial)

    def final_check(self, home: Path, trial: Trial) -> None:
        problems = differences(self.reference, home / self.key)
        stray = sorted(p.name for p in (home / self.key).rglob("*.partial"))  # unfinished zarr writes
        if stray:
            trial.failures.append(f"temporary files left in the store: {stray[:3]}")
        if problems:
            trial.failures.extend(problems)
            trial.lost += wrong_seqs(self.reference, home / self.key)

    # -------------------------------------------------------------------------------- fault kinds
    def kill9(self, rng: np.random.Generator, kills: int = 1) -> Trial:
        """SIGKILL ``kills`` times in a row, each at a random instant or at a random file write."""
        t0, trial, home, kept = time.perf_counter(), Trial("kill9"), self.fresh(), 0
        for _ in range(kills):
            if rng.random() < 0.5:
                at = float(rng.uniform(0, 1.1 * self.build_s))
                what, child = f"kill9 at {at:.2f}s", self.start(cli_args(self.config(home)))
                code, sub = child.stop(signal.SIGKILL, at), "kill9@instant"
            else:
                k, where = int(rng.integers(1, self.n_puts + 1)), ("before", "mid", "after")[rng.integers(3)]
                what = f"kill9 {where} write {k}"
                child = self.start(cli_args(self.config(home)), slow=False, fault=("kill", k, where))
                code, sub = child.stop(None, 0), "kill9@write"
            kept = self._check_exit(trial, home, child, code, -signal.SIGKILL, what, sub, kept)
        self.resume(home, trial, kept)
        trial.seconds = time.perf_counter() - t0
        return trial

    def sigint(self, rng: np.random.Generator) -> Trial:
        """Ctrl-C at a random instant, or right after a random file write (which reaches the finish)."""
        t0, trial, home = time.perf_counter(), Trial("sigint"), self.fresh()
        if rng.random() < 0.5:
            at = float(rng.uniform(0, 1.1 * self.build_s))
            what, child = f"sigint at {at:.2f}s", self.start(cli_args(self.config(home)))
            code = child.stop(signal.SIGINT, at)
        else:
            k = int(rng.integers(1, self.n_puts + 1))
            what, child = (
                f"sigint after write {k}",
                self.start(cli_args(self.config(home)), fault=("sigint", k)),
            )
            code = child.stop(None, 0)
        kept = self._check_exit(trial, home, child, code, 130, what, "sigint", 0)
        lines = child.text().strip().splitlines()
        if code == 130 and (len(lines) != 1 or not lines[0].startswith("error: interrupted")):
            trial.failures.append(f"{what}: output {lines!r}")
        self.resume(home, trial, kept)
        trial.seconds = time.perf_counter() - t0
        return trial

    def enospc(self, rng: np.random.Generator) -> Trial:
        """The disk fills at a random write; then space is freed and the build resumed."""
        t0, trial, home = time.perf_counter(), Trial("enospc"), self.fresh()
        k = int(rng.integers(0, self.n_puts))
        child = self.start(cli_args(self.config(home)), slow=False, fault=("enospc", k))
        code = child.stop(None, 0)
        kept = self._check_exit(trial, home, child, code, 2, f"disk full after {k} writes", "enospc", 0)
        last = (child.text().strip().splitlines() or [""])[-1]
        if code == 2 and not last.startswith("error: disk full"):
            trial.failures.append(f"disk full after {k} writes: last line {last!r}")
        said = re.search(r"the (\d+) completed chunks are kept", last)
        if said and min(int(said.group(1)) * TINY["chunk_seqs"], self.n_seq) != kept:
            trial.failures.append(f"disk full after {k} writes: {last!r}, but the manifest keeps {kept} seqs")
        self.resume(home, trial, kept)
        trial.seconds = time.perf_counter() - t0
        return trial

    def race(self, rng: np.random.Generator, kill_one: bool = False) -> Trial:
        """Two builds of the key started ``stagger`` apart: exactly one builds, the other finds the
        store complete (cache hit) or is refused by the lock; with ``kill_one`` the first is SIGKILLed
        at a random instant, and the second must then be refused or complete the store itself."""
        t0, trial, home = time.perf_counter(), Trial("race"), self.fresh()
        stagger = float(rng.uniform(0, 1.5 * self.build_s))
        first = self.start(cli_args(self.config(home)))
        time.sleep(stagger)
        second = self.start(cli_args(self.config(home)))
        trial.faults["race"] += 1
        codes = [first.stop(signal.SIGKILL if kill_one else None, stagger + rng.uniform(0, self.build_s))]
        codes.append(second.stop(None, 0))
        logs = [first.text(), second.text()]
        built = sum(line.startswith("built ") for log in logs for line in log.splitlines())
        hits = sum(line.startswith("cache hit") for log in logs for line in log.splitlines())
        refused = sum("another process is building" in log for log in logs)
        if kill_one and codes[0] == -signal.SIGKILL:
            trial.faults["kill9@race"] += 1
        trial.events.append(
            f"stagger {stagger:.2f}s: exits {codes}, built {built}, hit {hits}, refused {refused}"
        )
        if any("Traceback" in log for log in logs) or any(c not in (0, 2, -signal.SIGKILL) for c in codes):
            trial.failures.append(f"race: exits {codes}, logs {[log[-200:] for log in logs]}")
        if built > 1 or (not kill_one and built + hits + refused != 2) or (not kill_one and built != 1):
            trial.failures.append(f"race: {built} built, {hits} hits, {refused} refused")
        self.resume(home, trial, 0)
        trial.seconds = time.perf_counter() - t0
        return trial

    def _check_exit(self, trial, home, child: Child, code, expected, what, sub, kept) -> int:
        """Exit status and output of a faulted child; then the interrupted store (`_after_fault`)."""
        if code == 0:
            trial.events.append(f"{what}: the build had finished")
            return kept
        trial.faults[sub] += 1
        log = child.text()
        if code != expected or "Traceback" in log:
            trial.failures.append(f"{what}: exit {code}, log {log.strip()[-300:]!r}")
        return self._after_fault(home, trial, what, kept)

    def corrupt(self, rng: np.random.Generator, kill_repair: bool = False) -> Trial:
        from pipeline.repair import repair_store

        t0, trial, home = time.perf_counter(), Trial("corrupt"), self.fresh()
        location = home / self.key
        shutil.copytree(self.ref_location, location)
        damage = damage_chunks(location, rng, int(rng.integers(1, 4)))
        trial.faults.update(damage.values())
        trial.events.append(", ".join(f"{how} chunk {c} of {name}" for (c, name), how in damage.items()))
        found = verify_store(location).damaged
        if {(c, n) for c, names in found.items() for n in names} != set(damage):
            trial.failures.append(f"verify found {found}, damage was {sorted(damage)}")
        trial.failures.extend(refusals(location, damage))
        if kill_repair:  # SIGKILL the repair at one of its file writes (chunks, manifest, attributes)
            k, where = int(rng.integers(1, len(damage) + 4)), ("before", "mid", "after")[rng.integers(3)]
            args = ["repair", str(location), "--cache-dir", str(home)]
            code = self.start(args, fault=("kill", k, where)).stop(None, 0)
            trial.faults["kill9@repair"] += code == -signal.SIGKILL
            trial.events.append(f"repair killed {where} write {k}" if code < 0 else "repair finished first")
        rep = repair_store(location, model=self.model)
        trial.events.append(f"repair rewrote chunks {sorted(rep.chunks)}, {rep.exact} arrays bit-exact")
        self.final_check(home, trial)
        trial.seconds = time.perf_counter() - t0
        return trial

    def _after_fault(self, home: Path, trial: Trial, what: str, kept: int) -> int:
        """Completed chunks of the interrupted store must be intact; returns the sequences recorded."""
        location = home / self.key
        if not (location / "manifest.json").exists():
            trial.events.append(f"{what}: no store yet")
            return kept
        rep = verify_store(location)
        bad = [p for p in rep.problems if not p.startswith("store is incomplete")]
        if bad:
            trial.failures.append(f"{what}: the interrupted store has problems: {bad[:2]}")
            trial.lost += len(rep.damaged) * TINY["chunk_seqs"]
        trial.events.append(f"{what}: {rep.n_chunks} chunks recorded")
        if rep.n_seq < kept:
            trial.lost += kept - rep.n_seq
            trial.failures.append(f"{what}: {kept} sequences were recorded before, {rep.n_seq} now")
        return max(kept, rep.n_seq)


def damage_chunks(location: Path, rng: np.random.Generator, n: int) -> dict[tuple[int, str], str]:
    """Damage ``n`` distinct (chunk, array) files: flip one byte, truncate, or delete."""
    meta = json.loads((location / "zarr.json").read_text())["attributes"]
    names = array_names(meta["hooks"])
    n_chunks = -(-meta["n_seq"] // meta["chunk_seqs"])
    picks: dict[tuple[int, str], str] = {}
    while len(picks) < n:
        c, name = int(rng.integers(n_chunks)), names[int(rng.integers(len(names)))]
        path = chunk_file(location, name, c)
        if (c, name) in picks or not path.exists():  # zarr stores no file for an all-zero chunk
            continue
        raw = bytearray(path.read_bytes())
        how = ("flip", "truncate", "delete")[int(rng.integers(3))]
        if how == "flip":
            i = int(rng.integers(len(raw)))
            raw[i] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(raw))
        elif how == "truncate":
            path.write_bytes(bytes(raw[: int(rng.integers(len(raw)))]))
        else:
            path.unlink()
        picks[(c, name)] = how
    return picks


def summary(trials: list[Trial]) -> dict:
    kinds = sorted({t.kind for t in trials})
    return {
        "trials": len(trials),
        "trials_per_kind": {k: sum(t.kind == k for t in trials) for k in kinds},
        "faults_injected": dict(sorted(sum((t.faults for t in trials), Counter()).items())),
        "failures": sum(len(t.failures) for t in trials),
        "data_lost_seqs": sum(t.lost for t in trials),
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- disk full
def disk_full_scenario(small: str, work: str, free_bytes: int = 200_000) -> dict:
    """Run inside a mount namespace where ``small`` is a freshly mounted small tmpfs: fill it to
    ``free_bytes`` of free space, build into it with the real CLI until the disk is full, check the
    interrupted store, free the space, resume, and compare with a reference built in ``work``."""
    from click.testing import CliRunner

    from pipeline import models
    from pipeline.cli_cache import main

    model = models.load_model("tiny")
    models.load_model = lambda *a, **k: model
    ref = build_cache(CacheConfig(**TINY, cache_dir=str(Path(work) / "ref")), model=model)
    home = Path(small) / "cache"
    home.mkdir()
    (home / "models").symlink_to(paths.models_dir(), target_is_directory=True)
    st = os.statvfs(small)
    filler = Path(small) / "filler"
    filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - free_bytes, 0))
    args = cli_args(CacheConfig(**TINY, cache_dir=str(home)))
    full = CliRunner().invoke(main, args)
    location = home / ref.key
    rep = verify_store(location) if (location / "manifest.json").exists() else None
    filler.unlink()
    resumed = CliRunner().invoke(main, [*args, "--json"])
    return {
        "fs_bytes": st.f_blocks * st.f_frsize,
        "full_exit": full.exit_code,
        "full_stderr": full.stderr,
        "traceback": "Traceback" in full.output or not isinstance(full.exception, SystemExit | None),
        "kept_chunks": rep.n_chunks if rep else 0,
        "interrupted_problems": [p for p in (rep.problems if rep else []) if not p.startswith("store is")],
        "resume_exit": resumed.exit_code,
        "resume": json.loads(resumed.stdout.strip().splitlines()[-1]) if resumed.exit_code == 0 else None,
        "differences": differences(snapshot(Path(ref.location)), location),
        "partial_files": len(list(location.rglob("*.partial"))),
    }
