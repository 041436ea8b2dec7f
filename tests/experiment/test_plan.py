"""The research plan: run names select sections of experiments.toml, merged over [main]."""

import pytest

from pipeline.errors import UserError
from pipeline.experiment.plan import RUN_NAMES, load_plan
from pipeline.experiment.saes import sae_key, trainer_fields


def test_any_other_name_runs_main_and_run_1_matches_it():
    main, run1 = load_plan("my_run"), load_plan("run_1")
    assert main.name == "main" and run1.name == "run_1"
    assert [v.name for v in main.variants] == [v.name for v in run1.variants]
    assert main.seeds == run1.seeds and len(main.seeds) >= 3  # run_1's table needs >= 3 seeds
    assert {"topk", "relu_l1", "t_sae", "crosscoder", "tsae", "topk_2x"} <= {v.name for v in main.variants}


def test_every_run_section_loads_and_differs_where_the_plan_says():
    plans = {name: load_plan(name) for name in RUN_NAMES}
    windows = sorted({**plans["run_2"].tsae, **v.tsae}["memory_window"] for v in plans["run_2"].variants
                     if v.architecture == "tsae")
    assert windows == [1, 4, 8, 16, 32]
    flags = [v.tsae for v in plans["run_3"].variants if v.architecture == "tsae"]
    assert {"use_lstm", "use_gates", "use_bridge", "use_lifecycle_input"} <= {
        k for f in flags for k in f.get("model_kwargs", {})}
    assert plans["run_4"].layer != plans["run_1"].layer
    assert len(plans["run_5"].seeds) == 5 and plans["run_5"].static["expansion"] == 8
    assert plans["run_5"].static["k"] == plans["run_1"].static["k"]  # merged, not replaced


def test_smoke_lays_the_reduced_preset_over_the_run():
    smoke = load_plan("run_3", smoke=True)
    assert smoke.name == "run_3+smoke" and smoke.model == "tiny"
    assert smoke.static["n_tokens"] < load_plan("run_3").static["n_tokens"]
    assert [v.name for v in smoke.variants] == [v.name for v in load_plan("run_3").variants]


def test_sae_key_changes_with_what_changes_the_weights_only():
    plan = load_plan("main")
    v = next(v for v in plan.variants if v.name == "topk")
    s0, t0 = trainer_fields(plan, v, 0, 1)
    s1, t1 = trainer_fields(plan, v, 1, 1)
    key = sae_key("store", plan.hook, v, s0, t0, None, 0.1)
    assert key == sae_key("store", plan.hook, v, dict(s0, progress=True, log_every=1), t0, None, 0.1)
    assert key != sae_key("store", plan.hook, v, s1, t1, None, 0.1)
    assert key != sae_key("other-store", plan.hook, v, s0, t0, None, 0.1)
    assert trainer_fields(plan, v, 0, 10)[0]["n_tokens"] == 10 * s0["n_tokens"]


def test_the_compute_control_sees_the_teacher_plus_tsae_tokens():
    plan = load_plan("run_1")
    by = {v.name: v for v in plan.variants}
    control = trainer_fields(plan, by["topk_2x"], 0, 1)[0]["n_tokens"]
    teacher = trainer_fields(plan, by["topk"], 0, 1)[0]["n_tokens"]
    tsae = trainer_fields(plan, by["tsae"], 0, 1)[1]
    assert control == teacher + sum(tsae[f] for f in ("distill_tokens", "introduce_tokens", "refine_tokens"))


def test_a_broken_plan_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "plan.toml"
    bad.write_text("[main\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_plan("main", path=bad)
    bad.write_text('[main]\nvariants = ["nope"]\n')
    with pytest.raises(UserError, match="unknown variant"):
        load_plan("main", path=bad)
