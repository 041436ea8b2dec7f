"""The whole experiment: cache -> train -> evaluate -> analyse -> final_info.json + figures + report.

    run_experiment(out_dir="run_1")            # the plan is chosen by the folder's name
    run_experiment(out_dir="tmp", smoke=True)  # the reduced preset (tiny model) used by the tests

Stage outputs are reused across runs: the activation store by its cache key, every trained SAE by the
hash of its configuration and data (pipeline/experiment/saes.py).  A warm rerun only evaluates and
analyses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.experiment.plan import ExperimentPlan, load_plan


@dataclass
class ExperimentResult:
    out_dir: Path
    plan: ExperimentPlan
    cache_hit: bool
    trained: list = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    final_info: dict = field(default_factory=dict)


def make_logger(out_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"tsae.experiment.{out_dir}")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(out_dir / "run.log", mode="a"), logging.StreamHandler()):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.propagate = False
    return log


def run_experiment(out_dir: str | Path, *, smoke: bool = False, plan: ExperimentPlan | None = None,
                   cache_dir: str | None = None) -> ExperimentResult:
    import torch

    if not str(out_dir).strip():  # Path("") is the working directory: never write a run there by accident
        raise UserError("--out_dir is empty: name the run folder, e.g. --out_dir=run_1")
    out = Path(out_dir).resolve()
    plan = plan or load_plan(out.name, smoke=smoke)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-check").touch()
        (out / ".write-check").unlink()
    except OSError as err:
        raise UserError(f"cannot write to {out}: {err.strerror}") from None
    log = make_logger(out)
    cuda = torch.cuda.is_available()
    scale = plan.gpu_token_scale if cuda else 1
    log.info(f"experiment {plan.name}: {plan.description}")
    log.info(f"device {'cuda' if cuda else 'cpu'}; token budgets x{scale}")
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    res = ExperimentResult(out, plan, cache_hit=False)

    t = time.perf_counter()
    store_key, res.cache_hit = ensure_cache(plan, scale, cache_dir, log)
    res.timings["cache_s"] = time.perf_counter() - t

    from pipeline.experiment.saes import train_plan

    t = time.perf_counter()
    res.trained = train_plan(plan, store_key, out, token_scale=scale, cache_dir=cache_dir, log=log.info)
    res.timings["train_s"] = time.perf_counter() - t
    reused = sum(s.reused for s in res.trained)
    log.info(f"trained {len(res.trained) - reused} SAE(s), reused {reused} identical SAE(s)")

    from pipeline.models import load_model

    model = load_model(plan.model, dtype=plan.compute_dtype, cache_home=cache_dir)
    t = time.perf_counter()
    evaluate(plan, store_key, res.trained, out, model, cache_dir, log)
    res.timings["eval_s"] = time.perf_counter() - t

    from pipeline.experiment.outputs import write_outputs

    t = time.perf_counter()
    res.final_info = write_outputs(plan, store_key, res, model, cache_dir, log)
    res.timings["analysis_s"] = time.perf_counter() - t
    log.info("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in res.timings.items()))
    (out / "timings.json").write_text(json.dumps(res.timings, indent=2))
    log.info(f"wrote {out / 'final_info.json'} and {out / 'report.html'}")
    return res


def ensure_cache(plan: ExperimentPlan, scale: int, cache_dir: str | None, log) -> tuple[str, bool]:
    from pipeline.cache_runner import CacheConfig, build_cache

    cfg = CacheConfig(model=plan.model, layers=(plan.layer,), dataset=plan.dataset, split=plan.split,
                      ctx=plan.ctx, max_tokens=plan.max_tokens * scale, prepend_bos=plan.prepend_bos,
                      dtype=plan.compute_dtype, store_dtype=plan.store_dtype, cache_dir=cache_dir,
                      progress=False)
    r = build_cache(cfg)
    if r.hit:
        log.info(f"cache hit: reusing store {r.key} ({r.n_seq} sequences); no activation recomputed")
    else:
        log.info(f"cache built: {r.key} ({r.n_seq} sequences, {r.computed_tokens} tokens computed in "
                 f"{r.seconds:.0f}s)")
    return r.key, r.hit


def evaluate(plan: ExperimentPlan, store_key: str, trained: list, out: Path, model, cache_dir, log) -> None:
    """Evaluate every SAE, unless out/eval already holds the results of this exact evaluation."""
    from pipeline.eval_runner import run_eval

    cfg = eval_config(plan, store_key, trained, out, cache_dir)
    key = eval_key(cfg, trained)
    done = out / "eval" / "eval_key.txt"
    if done.is_file() and done.read_text() == key and all(
            (out / "eval" / s.folder.name / "metrics.json").is_file() for s in trained):
        log.info("reuse evaluation: out_dir/eval holds this exact evaluation of these exact SAEs")
    else:
        log.info(f"evaluating {len(trained)} SAE(s) on held-out sequences")
        done.unlink(missing_ok=True)
        run_eval(cfg, model=model)
        done.write_text(key)
    for s in trained:  # each SAE folder carries its own metrics.json
        src = out / "eval" / s.folder.name / "metrics.json"
        if src.is_file():
            (s.folder / "metrics.json").write_text(src.read_text())


def eval_config(plan: ExperimentPlan, store_key: str, trained: list, out: Path, cache_dir):
    from pipeline.eval_runner import EvalConfig

    e = dict(plan.eval)
    return EvalConfig(saes=[str(s.folder) for s in trained], store=store_key, out_dir=str(out / "eval"),
                      model=plan.model, hook=plan.hook, val_fraction=plan.val_fraction,
                      probe_tasks=tuple(e.pop("probe_tasks", ())),
                      faithfulness_sizes=tuple(e.pop("faithfulness_sizes", (1, 2, 5, 10, 20, 50, 100))),
                      dtype=plan.compute_dtype, cache_dir=cache_dir, **e)


def eval_key(cfg, trained: list) -> str:
    """Identity of an evaluation: its configuration and the content keys of the SAEs evaluated."""
    doc = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("saes", "out_dir", "log")},
           "saes": {s.folder.name: s.key for s in trained}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
