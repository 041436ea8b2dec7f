"""Soak test of the activation cache under faults: many random crashes, disk-full and damage trials.

Every trial builds the same key (tiny model, layer 1, 96 sequences of 32 tokens in 12 chunks) in
forked processes running the real `tsae-cache` CLI, injects one fault kind, then finishes in this
process and compares the result with a fault-free reference (`tests/reliability/cache_faults.py`,
with `forked_cli.py` and `store_compare.py` beside it):

- ``kill9``   SIGKILL at a random instant of the build, 1-3 times in a row (later kills hit the
              resuming build), then resume;
- ``sigint``  Ctrl-C at a random instant: exit 130 with one line, then resume;
- ``enospc``  the disk fills at a random file write (all later writes fail): exit 2 with one line,
              then space is freed and the build resumed;
- ``corrupt`` 1-3 random chunk files flipped, truncated or deleted: verify must name exactly them,
              reads of them must be refused, and `repair` (SIGKILLed once at a random instant in
              half of these trials) must restore the reference;
- ``race``    two builds of the key started a random interval apart (the first SIGKILLed at a random
              instant in half of these trials): one builds, the other is a cache hit or is refused
              by the lock, never a second writer.

A trial fails if any exit status, message or check is wrong; data lost counts sequences that a
resume failed to keep or that differ from the reference at the end (target: 0).

    python bench/soak_cache.py                     # 20 trials, seed 0
    python bench/soak_cache.py --trials 100 --seed 3

The last line is JSON: {"name": "soak_cache_data_lost", "value": 0.0, "target": "== 0", ...}, the
value being the fraction of all trials' sequences lost (data_lost_seqs / (trials * sequences)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))

from cache_faults import KINDS, Rig, log, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow", type=float, default=0.02, help="seconds added to each forward batch")
    ap.add_argument("--keep", action="store_true", help="keep the trial folders")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from pipeline.models import load_model

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tsae-soak-"))
    rng = np.random.default_rng(args.seed)
    try:
        rig = Rig(load_model("tiny"), root, slow_s=args.slow)
        log(
            f"reference {rig.key}: {rig.n_seq} sequences; a slowed build takes {rig.build_s:.2f} s, "
            f"{rig.n_puts} file writes"
        )
        trials = []
        for i in range(args.trials):
            kind = KINDS[i % len(KINDS)]
            if kind == "kill9":
                trial = rig.kill9(rng, kills=1 + (i // len(KINDS)) % 3)
            elif kind == "sigint":
                trial = rig.sigint(rng)
            elif kind == "enospc":
                trial = rig.enospc(rng)
            elif kind == "corrupt":
                trial = rig.corrupt(rng, kill_repair=(i // len(KINDS)) % 2 == 1)
            else:
                trial = rig.race(rng, kill_one=(i // len(KINDS)) % 2 == 1)
            trials.append(trial)
            status = "FAIL " + "; ".join(trial.failures[:3]) if trial.failures else "ok"
            log(
                f"trial {i:3d} {trial.kind:8s} faults={trial.faults} lost={trial.lost} "
                f"{trial.seconds:5.2f}s {status} | {' | '.join(trial.events)}"
            )
        rig.close()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    s = summary(trials)
    print(f"trials: {s['trials']} {s['trials_per_kind']}")
    print(f"faults injected per kind: {s['faults_injected']}")
    print(f"failures: {s['failures']}")
    print(f"data lost (sequences): {s['data_lost_seqs']}")
    print(f"seconds: {time.perf_counter() - t0:.1f}")
    print(
        json.dumps(
            {
                "name": "soak_cache_data_lost",
                "value": round(s["data_lost_seqs"] / (s["trials"] * rig.n_seq), 6),
                "unit": "sequences lost / sequences built, over all trials",
                "target": "== 0",
                "data_lost_seqs": s["data_lost_seqs"],
                "failures": s["failures"],
                "trials": s["trials"],
                "faults": s["faults_injected"],
                "seed": args.seed,
            }
        )
    )


if __name__ == "__main__":
    main()
