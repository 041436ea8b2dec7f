"""The training stage: one SAE trained on the training split of an activation store.

    result = run_training(TrainRunConfig(store="<key or path>", out_dir="runs/topk", architecture="topk",
                                         static={"k": 32, "n_tokens": 2_000_000}))

    python -m pipeline.train_runner --store KEY --out runs/tsae --arch tsae \\
        --set k=32 --set distill_tokens=500000 --static-sae runs/topk

Writes into `out_dir`: cfg.json + sae_weights.safetensors (the SAE for raw activations),
trainer_cfg.json, run_cfg.json, train_log.jsonl, checkpoints/.

* Sequences: the store's training split `store.split(val_fraction, split_seed)[0]` (whole documents;
  the evaluation stage holds out the other side with the same arguments).
* Position 0 is left out when the store prepended BOS (`skip_bos`): its residual is an attention
  sink with an outlier norm.  The input scale then comes from a sample of the other positions
  (the store's statistics include position 0); otherwise from the store's `mean_norm`.
* An out_dir holding checkpoints but no finished SAE is resumed (same configuration required);
  a finished one is refused unless `overwrite`.  So after a crash (even `kill -9`), rerunning the
  same command continues from the last complete checkpoint to the same weights.
* Data-parallel: `torchrun --nproc_per_node=W -m pipeline.train_runner ...` (same arguments) trains
  on W ranks, `batch_windows` being the global batch (tsae/train/distributed.py); rank 0 prepares
  the out_dir, prints and writes; every rank reads the store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

STATIC_ARCHS = ("relu_l1", "topk", "t_sae", "crosscoder")
ARCHS = (*STATIC_ARCHS, "tsae")
RUN_CONFIG_FILE = "run_cfg.json"
# fields that may differ between a run and its resumption
_VOLATILE = {"progress", "device", "log_every", "checkpoint_every"}


@dataclass
class TrainRunConfig:
    store: str  # activation store key (under the cache home) or path
    out_dir: str
    architecture: str = "topk"  # relu_l1 | topk | t_sae | crosscoder | tsae
    hook: str | None = None  # default: the store's only hook
    cache_dir: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    skip_bos: bool = True
    static: dict[str, Any] = field(default_factory=dict)  # StaticTrainerConfig fields
    tsae: dict[str, Any] = field(default_factory=dict)  # TSAETrainerConfig fields (architecture tsae)
    static_sae: str | None = None  # tsae: a pretrained static TopK SAE folder; None trains one
    overwrite: bool = False


# value ranges of trainer config fields (StaticTrainerConfig, TSAETrainerConfig, their loop fields)
_POSITIVE = {"k", "lr", "batch_windows", "window", "n_tokens", "expansion", "memory_window", "lstm_hidden",
             "log_every", "grad_clip"}
_NON_NEGATIVE = {"k_start", "d_sae", "auxk", "l1", "gate_l1", "lr_warmup_tokens", "skip_positions",
                 "dead_window_tokens", "distill_tokens", "introduce_tokens", "refine_tokens",
                 "revive_every_tokens", "checkpoint_every"}
_FRACTIONS = {"k_anneal_frac", "l1_warm_up_frac", "lr_decay_frac"}


def _checked(cls, f: dataclasses.Field, value: Any) -> Any:
    """`value` for field f (an integral float such as 1e6 becomes an int for an int field); a
    UserError unless it has the type of the field's default and lies in the field's range."""
    default = f.default if f.default is not dataclasses.MISSING else None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = number and float(value).is_integer()
    elif isinstance(default, float):
        ok = number
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return value  # containers and nested configs: checked where they are used
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
        raise UserError(f"{cls.__name__}.{f.name} must be {kind}, got {value!r}")
    if ((f.name in _POSITIVE and not value > 0) or (f.name in _NON_NEGATIVE and not value >= 0)
            or (f.name in _FRACTIONS and not 0 <= value <= 1)):
        bound = "> 0" if f.name in _POSITIVE else ">= 0" if f.name in _NON_NEGATIVE else "in [0, 1]"
        raise UserError(f"{cls.__name__}.{f.name} must be {bound}, got {value!r}")
    return int(value) if isinstance(default, int) and not isinstance(default, bool) else value


def _trainer_config(cfg: TrainRunConfig):
    from tsae.train.static_trainer import StaticTrainerConfig
    from tsae.train.tsae_trainer import TSAETrainerConfig

    def build(cls, fields: dict[str, Any]):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise UserError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**{name: _checked(cls, known[name], value) for name, value in fields.items()})

    static = build(StaticTrainerConfig, {"architecture": cfg.architecture if cfg.architecture != "tsae"
                                         else "topk", **cfg.static})
    if cfg.architecture != "tsae":
        return static
    tsae = build(TSAETrainerConfig, {**cfg.tsae, "static": static})
    if tsae.n_tokens <= 0:
        raise UserError("TSAETrainerConfig: distill_tokens + introduce_tokens + refine_tokens must be > 0")
    return tsae


def _hook(store, wanted: str | None) -> str:
    if wanted is None:
        if len(store.hooks) != 1:
            raise UserError(f"store {store.key} holds several hooks ({', '.join(store.hooks)}); pass --hook")
        return store.hooks[0]
    if wanted not in store.hooks:
        raise UserError(f"store {store.key} holds {', '.join(store.hooks)}, not {wanted}")
    return wanted


def _load_static(folder: str | None):
    """The pretrained static TopK SAE a TSAE starts from (tsae or SAELens folder), or None."""
    if folder is None:
        return None
    from tsae.models.registry import load_sae
    from tsae.models.topk import TopKSAE
    from tsae.models.tsae import TemporalSAE

    try:
        sae = load_sae(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the static SAE at {folder}: {e}") from None
    if not isinstance(sae, TopKSAE) or isinstance(sae, TemporalSAE):
        raise UserError(f"{folder} holds a {sae.architecture} SAE; the TSAE starts from a static topk SAE")
    return sae


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_comparable(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in _VOLATILE}


def _prepare_out_dir(out: Path, run_doc: dict[str, Any], overwrite: bool) -> bool:
    """-> resume?  Refuses a finished run (unless overwrite) and a checkpointed run of another config."""
    from tsae.train.checkpoint import latest_checkpoint

    if (out / "cfg.json").is_file() and (out / "trainer_cfg.json").is_file():
        if not overwrite:
            raise UserError(f"{out} already holds a trained SAE; pass --overwrite or another --out")
        shutil.rmtree(out)
    if latest_checkpoint(out / "checkpoints") is None:
        return False
    previous = json.loads((out / RUN_CONFIG_FILE).read_text()) if (out / RUN_CONFIG_FILE).is_file() else {}
    if _comparable(previous) != _comparable(run_doc):
        if not overwrite:
            raise UserError(f"{out} holds checkpoints of a different configuration; pass --overwrite or "
                            "another --out")
        shutil.rmtree(out)
        return False
    return True


def run_training(cfg: TrainRunConfig):
    """Train one SAE as configured; returns the trainer's TrainResult."""
    from pipeline.store import ActivationStore

    if cfg.architecture not in ARCHS:
        raise UserError(f"unknown architecture {cfg.architecture!r}; choose from {', '.join(ARCHS)}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    tcfg = _trainer_config(cfg)
    store = ActivationStore.open(cfg.store, cfg.cache_dir)
    hook = _hook(store, cfg.hook)
    train_idx, _ = store.split(cfg.val_fraction, cfg.split_seed)
    if len(train_idx) == 0:
        raise UserError(f"store {store.key} has too few documents to hold out val_fraction="
                        f"{cfg.val_fraction} of them and still train")
    skip = 1 if cfg.skip_bos and store.attrs.get("prepend_bos", False) else 0
    if cfg.architecture == "tsae":
        tcfg.skip_positions = tcfg.static.skip_positions = skip
    else:
        tcfg.skip_positions = skip
    layer = re.match(r"blocks\.(\d+)\.", hook)
    meta = {"model_name": store.attrs["model"]["name"], "hook_name": hook,
            "hook_layer": int(layer.group(1)) if layer else -1}
    stats_norm = None if skip else float(store.stats(hook)["mean_norm"])

    out = Path(cfg.out_dir)
    run_doc = {**dataclasses.asdict(cfg), "store_key": store.key, "hook": hook, "skip_positions": skip,
               "trainer_cfg": dataclasses.asdict(tcfg)}
    resume = _prepare_on_rank0(out, run_doc, cfg.overwrite)

    acts = store.activations(hook)
    common = dict(out_dir=out, resume=out if resume else None, stats_mean_norm=stats_norm,
                  seq_indices=train_idx, meta=meta)
    if cfg.architecture == "tsae":
        from tsae.train.tsae_trainer import train_tsae

        return train_tsae(tcfg, acts, static=_load_static(cfg.static_sae), **common)
    from tsae.train.static_trainer import train_static

    return train_static(tcfg, acts, **common)


def _prepare_on_rank0(out: Path, run_doc: dict[str, Any], overwrite: bool) -> bool:
    """Rank 0 checks and prepares the out_dir and writes run_cfg.json; every rank gets its verdict
    (resume, or the same UserError)."""
    from tsae.train.distributed import current

    dist = current()
    verdict: tuple[bool, str | None] = (False, None)
    if dist.is_main:
        try:
            verdict = (_prepare_out_dir(out, run_doc, overwrite), None)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / (RUN_CONFIG_FILE + ".tmp")
            tmp.write_text(json.dumps(run_doc, indent=2, sort_keys=True, default=str))
            tmp.replace(out / RUN_CONFIG_FILE)
        except UserError as e:
            verdict = (False, str(e))
    resume, error = dist.broadcast_object(verdict)
    if error is not None:
        raise UserError(error)
    return resume


# ---------------------------------------------------------------------------------------------- CLI
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train_runner", description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="activation store key or path")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--arch", default="topk", choices=ARCHS)
    p.add_argument("--hook")
    p.add_argument("--cache-dir")
    p.add_argument("--static-sae", help="tsae: pretrained static TopK SAE folder (SAELens or tsae)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="trainer config field (JSON value); tsae: static.FIELD for its static pretraining")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--keep-bos", action="store_true", help="train on position 0 too")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    static, tsae = {}, {}
    from tsae.train import distributed

    main_rank = int(os.environ.get("RANK", "0")) == 0  # only rank 0 speaks
    try:
        for item in args.set:
            name, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
            if args.arch == "tsae" and not name.startswith("static."):
                tsae[name] = _parse_value(value)
            else:
                static[name.removeprefix("static.")] = _parse_value(value)
        cfg = TrainRunConfig(store=args.store, out_dir=args.out, architecture=args.arch, hook=args.hook,
                             cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                             skip_bos=not args.keep_bos, static=static, tsae=tsae,
                             static_sae=args.static_sae, overwrite=args.overwrite)
        distributed.init_from_env(str(static.get("device", tsae.get("device", "auto"))))
        run_training(cfg)
    except UserError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if main_rank:
            print(f"interrupted; rerun the same command to resume from {args.out}/checkpoints",
                  file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    if main_rank:
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
