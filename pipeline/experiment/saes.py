"""Train every (variant, seed) of a plan, or reuse an identical SAE trained by an earlier run.

A trained SAE lives once under `<cache home>/saes/<variant>_s<seed>_<hash12>/`, where the hash covers
everything that changes its weights: the store key and hook, the architecture, the full trainer
configuration, the teacher's own key (TSAE) and the split.  A run's `out_dir/saes/<variant>_s<seed>/`
holds hard links (or copies) of its files, so each run folder is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths
from pipeline.experiment.plan import ExperimentPlan, Variant, deep_merge, teacher_variant

SAE_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_cfg.json", "run_cfg.json", "train_log.jsonl")
TOKEN_FIELDS = ("n_tokens", "distill_tokens", "introduce_tokens", "refine_tokens", "lr_warmup_tokens",
                "revive_every_tokens")


@dataclass
class TrainedSAE:
    variant: str
    seed: int
    architecture: str
    key: str
    cache_folder: Path
    folder: Path  # inside the run's out_dir
    reused: bool
    seconds: float  # wall time of this run's training (0 when reused)
    train_seconds: float  # wall time recorded when it was trained
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.variant}_s{self.seed}"


def trainer_fields(plan: ExperimentPlan, variant: Variant, seed: int, token_scale: int) -> tuple[dict, dict]:
    static = deep_merge(plan.static, variant.static)
    static.update(seed=seed, architecture=variant.architecture if variant.architecture != "tsae" else "topk")
    tsae = deep_merge(plan.tsae, variant.tsae) if variant.architecture == "tsae" else {}
    if tsae:
        tsae["seed"] = seed
    for block in (static, tsae):
        for f in TOKEN_FIELDS:
            if f in block:
                block[f] = int(block[f] * token_scale * variant.token_multiplier)
    return static, tsae


def sae_key(store_key: str, hook: str, variant: Variant, static: dict, tsae: dict, teacher_key: str | None,
            val_fraction: float) -> str:
    from tsae.models.registry import sae_class

    volatile = {"progress", "device", "log_every", "checkpoint_every"}
    doc = {"store": store_key, "hook": hook, "architecture": variant.architecture,
           "format": sae_class(variant.architecture).format_version,
           "static": {k: v for k, v in static.items() if k not in volatile},
           "tsae": {k: v for k, v in tsae.items() if k not in volatile},
           "teacher": teacher_key, "val_fraction": val_fraction}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_sae(plan: ExperimentPlan, variant: Variant, seed: int, store_key: str, out_dir: Path, *,
               token_scale: int = 1, teacher: TrainedSAE | None = None, cache_dir: str | None = None,
               log=print) -> TrainedSAE:
    from pipeline.train_runner import TrainRunConfig, run_training

    static, tsae = trainer_fields(plan, variant, seed, token_scale)
    key = sae_key(store_key, plan.hook, variant, static, tsae, teacher.key if teacher else None,
                  plan.val_fraction)
    cache_folder = paths.saes_dir(cache_dir) / f"{variant.name}_s{seed}_{key}"
    done = (cache_folder / "cfg.json").is_file() and (cache_folder / "trainer_cfg.json").is_file()
    t0 = time.perf_counter()
    if done:
        log(f"reuse   {variant.name} seed {seed}: identical SAE already trained ({cache_folder.name})")
    else:
        log(f"train   {variant.name} seed {seed} -> {cache_folder.name}")
        run_training(TrainRunConfig(store=store_key, out_dir=str(cache_folder),
                                    architecture=variant.architecture, hook=plan.hook, cache_dir=cache_dir,
                                    val_fraction=plan.val_fraction, static=static, tsae=tsae,
                                    static_sae=str(teacher.cache_folder) if teacher else None))
        (cache_folder / "train_time.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    seconds = 0.0 if done else time.perf_counter() - t0
    recorded = json.loads((cache_folder / "train_time.json").read_text())["seconds"] \
        if (cache_folder / "train_time.json").is_file() else float("nan")
    folder = out_dir / "saes" / f"{variant.name}_s{seed}"
    link_files(cache_folder, folder)
    phases = ("distill_tokens", "introduce_tokens", "refine_tokens")
    tokens = sum(int(tsae.get(p, 0)) for p in phases) if tsae else int(static.get("n_tokens", 0))
    return TrainedSAE(variant.name, seed, variant.architecture, key, cache_folder, folder, done, seconds,
                      recorded, tokens)


def train_plan(plan: ExperimentPlan, store_key: str, out_dir: Path, *, token_scale: int = 1,
               cache_dir: str | None = None, log=print) -> list[TrainedSAE]:
    """Every variant for every seed; a TSAE variant starts from its seed's teacher (trained first)."""
    trained: list[TrainedSAE] = []
    for seed in plan.seeds:
        teacher = None
        if any(v.architecture == "tsae" for v in plan.variants):
            tv = teacher_variant(plan)
            teacher = ensure_sae(plan, tv, seed, store_key, out_dir, token_scale=token_scale,
                                 cache_dir=cache_dir, log=log)
            if tv in plan.variants:
                trained.append(teacher)
        for v in plan.variants:
            if teacher is not None and v.name == teacher.variant:
                continue
            trained.append(ensure_sae(plan, v, seed, store_key, out_dir, token_scale=token_scale,
                                      teacher=teacher if v.architecture == "tsae" else None,
                                      cache_dir=cache_dir, log=log))
    return trained


def link_files(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) an SAE's files into a run folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SAE_FILES:
        s, d = src / name, dst / name
        if not s.is_file():
            continue
        if d.exists():
            d.unlink()
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
