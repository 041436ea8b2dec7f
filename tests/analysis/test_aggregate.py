import json
import math

import numpy as np
import pytest

from tsae.analysis.aggregate import (
    FinalInfoError,
    aggregate_seeds,
    build_final_info,
    comparison_table,
    load_final_info,
    mean_std,
    validate_final_info,
    write_final_info,
)

SEEDS = [
    {"tsae": {"fvu": 0.10, "l0": 32.0, "gate_mean": 0.4}, "topk": {"fvu": 0.12, "l0": 32.0}},
    {"tsae": {"fvu": 0.14, "l0": 31.0, "gate_mean": 0.5}, "topk": {"fvu": 0.13, "l0": 32.0}},
    {"tsae": {"fvu": 0.12, "l0": 33.0, "gate_mean": 0.6}, "topk": {"fvu": 0.14, "l0": 32.0}},
]


def test_mean_and_sample_std_over_seeds():
    agg = aggregate_seeds(SEEDS)
    assert agg["tsae"]["fvu_mean"] == pytest.approx(0.12)
    assert agg["tsae"]["fvu_std"] == pytest.approx(np.std([0.10, 0.14, 0.12], ddof=1))  # 0.02
    assert agg["tsae"]["gate_mean_mean"] == pytest.approx(0.5)
    assert agg["topk"]["l0_std"] == 0.0  # identical values: exactly zero
    assert "gate_mean_mean" not in agg["topk"]
    assert aggregate_seeds(SEEDS[:1])["tsae"]["fvu_std"] == 0.0
    assert mean_std(agg["tsae"])["fvu"] == pytest.approx((0.12, 0.02))


def test_inconsistent_seeds_are_rejected():
    missing = [SEEDS[0], {"tsae": {"fvu": 0.1, "l0": 30.0}, "topk": SEEDS[1]["topk"]}]
    with pytest.raises(ValueError, match="gate_mean"):
        aggregate_seeds(missing)
    with pytest.raises(ValueError, match="relu"):
        aggregate_seeds([SEEDS[0], {**SEEDS[1], "relu": {"fvu": 0.2}}])


def test_final_info_roundtrip(tmp_path):
    info = build_final_info({"shakespeare": SEEDS})
    path = write_final_info(tmp_path / "final_info.json", info)
    raw = json.loads(path.read_text())
    assert list(raw) == ["shakespeare"] and set(raw["shakespeare"]) == {"tsae", "topk"}
    assert load_final_info(path) == info


@pytest.mark.parametrize("bad, match", [
    ({}, "non-empty"),
    ({"shakespeare": {}}, "non-empty dict keyed by model"),
    ({"shakespeare": {"tsae": {"fvu_mean": math.nan, "fvu_std": 0.1}}}, "finite"),
    ({"shakespeare": {"tsae": {"fvu_mean": 0.1, "fvu_std": math.inf}}}, "finite"),
    ({"shakespeare": {"tsae": {"fvu_mean": 0.1}}}, "no matching 'fvu_std'"),
    ({"shakespeare": {"tsae": {"fvu_std": 0.1}}}, "no matching 'fvu_mean'"),
    ({"shakespeare": {"tsae": {"fvu": 0.1}}}, "neither"),
    ({"shakespeare": {"tsae": {"fvu_mean": "0.1", "fvu_std": 0.0}}}, "finite number"),
    ({"shakespeare": {"tsae": {"fvu_mean": True, "fvu_std": 0.0}}}, "finite number"),
    ({"shakespeare": {"tsae": {"fvu_mean": 0.1, "fvu_std": -0.1}}}, "negative"),
])
def test_validator_rejects(bad, match):
    with pytest.raises(FinalInfoError, match=match):
        validate_final_info(bad)


def test_nan_seed_fails_validation_and_is_never_written(tmp_path):
    seeds = [SEEDS[0], {**SEEDS[1], "topk": {"fvu": math.nan, "l0": 32.0}}, SEEDS[2]]
    with pytest.raises(FinalInfoError, match="shakespeare.topk.fvu_mean"):
        build_final_info({"shakespeare": seeds})
    bad = {"shakespeare": aggregate_seeds(seeds)}
    with pytest.raises(FinalInfoError):
        write_final_info(tmp_path / "f.json", bad)
    assert not (tmp_path / "f.json").exists()


def test_comparison_table():
    block = build_final_info({"d": SEEDS})["d"]
    md = comparison_table(block, better={"fvu": "lower"})
    lines = md.strip().splitlines()
    assert lines[0] == "| metric | tsae | topk |"
    assert lines[2] == "| fvu ↓ | **0.12 ± 0.02** | 0.13 ± 0.01 |"  # lower is better: tsae bold
    assert "| gate_mean | 0.5 ± 0.1 | – |" in lines
    html = comparison_table(block, ["l0"], fmt="html")
    assert html.count("<tr>") == 2 and "32 ± 0" in html
