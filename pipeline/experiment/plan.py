"""The experiment plan: a run section of `experiments.toml`, merged over [main], as one dataclass.

`load_plan("run_2")` gives [main] with [run_2]'s fields on top (tables merge key by key); any name
that is not a section gives [main].  `smoke=True` lays [smoke] on top of that.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

PLAN_FILE = Path(__file__).resolve().parents[2] / "experiments.toml"
RUN_NAMES = ("run_1", "run_2", "run_3", "run_4", "run_5")


@dataclass
class Variant:
    name: str
    architecture: str
    static: dict[str, Any] = field(default_factory=dict)  # overrides of the plan's static trainer fields
    tsae: dict[str, Any] = field(default_factory=dict)  # overrides of the plan's TSAE trainer fields
    token_multiplier: float = 1.0  # scales the variant's token budgets (e.g. a compute-matched control)


@dataclass
class ExperimentPlan:
    name: str  # the section that was run: main, run_1..run_5 (+ "+smoke")
    description: str
    model: str
    layer: int
    dataset: str
    split: str
    ctx: int
    prepend_bos: bool
    max_tokens: int
    compute_dtype: str
    store_dtype: str
    val_fraction: float
    seeds: list[int]
    variants: list[Variant]
    teacher: str
    gpu_token_scale: int
    static: dict[str, Any]
    tsae: dict[str, Any]
    eval: dict[str, Any]
    analysis: dict[str, Any]

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_plan_file(path: Path = PLAN_FILE) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"plan file {path} not found") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"plan file {path} is not valid TOML: {err}") from None


def load_plan(run_name: str, smoke: bool = False, path: Path = PLAN_FILE) -> ExperimentPlan:
    doc = read_plan_file(path)
    if "main" not in doc:
        raise UserError(f"plan file {path} has no [main] section")
    section = run_name if run_name in doc and run_name.startswith("run_") else "main"
    merged = deep_merge(doc["main"], doc.get(section, {})) if section != "main" else dict(doc["main"])
    name = section
    if smoke:
        merged = deep_merge(merged, doc.get("smoke", {}))
        name += "+smoke"
    variants_doc = doc.get("variants", {})
    return _build(name, merged, variants_doc, path)


def _build(name: str, d: dict[str, Any], variants_doc: dict[str, Any], path: Path) -> ExperimentPlan:
    variants = []
    for v in d.get("variants", []):
        if v not in variants_doc:
            raise UserError(f"{path}: run {name} lists unknown variant {v!r}")
        spec = variants_doc[v]
        variants.append(_variant(v, spec))
    teacher = d.get("teacher", "topk")
    if any(v.architecture == "tsae" for v in variants) and teacher not in variants_doc:
        raise UserError(f"{path}: teacher variant {teacher!r} is not defined")
    fields = {f: d.get(f) for f in ("description", "model", "layer", "dataset", "split", "ctx", "prepend_bos",
                                    "max_tokens", "compute_dtype", "store_dtype", "val_fraction", "seeds",
                                    "gpu_token_scale")}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise UserError(f"{path}: run {name} lacks {', '.join(missing)}")
    return ExperimentPlan(name=name, variants=variants, teacher=teacher, static=d.get("static", {}),
                          tsae=d.get("tsae", {}), eval=d.get("eval", {}), analysis=d.get("analysis", {}),
                          **fields)


def teacher_variant(plan: ExperimentPlan, path: Path = PLAN_FILE) -> Variant:
    """The static TopK variant the plan's TSAEs start from (listed or not)."""
    for v in plan.variants:
        if v.name == plan.teacher:
            return v
    return _variant(plan.teacher, read_plan_file(path)["variants"][plan.teacher])


def _variant(name: str, spec: dict[str, Any]) -> Variant:
    return Variant(name, spec["architecture"], spec.get("static", {}), spec.get("tsae", {}),
                   float(spec.get("token_multiplier", 1.0)))
