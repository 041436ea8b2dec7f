"""`python experiment.py --out_dir=DIR --smoke` end to end, twice: artefacts, schema, and reuse.

The smoke preset (tiny random model) runs the real code path of every stage.  The second run must
reuse the activation cache and every trained SAE, so it only evaluates and analyses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tsae.analysis.aggregate import validate_final_info
from tsae.analysis.plotting import is_png
from tsae.analysis.report import check_report

REPO = Path(__file__).resolve().parents[2]


def run_smoke(out_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TSAE_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, str(REPO / "experiment.py"), f"--out_dir={out_dir}", "--smoke"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, models_home):
    from pipeline import paths

    cache = tmp_path_factory.mktemp("cache")
    shared = paths.models_dir(models_home)
    shared.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(shared, target_is_directory=True)
    root = tmp_path_factory.mktemp("runs")
    first = run_smoke(root / "first", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_smoke(root / "second", cache)
    assert second.returncode == 0, second.stderr[-3000:]
    return root / "first", root / "second"


def test_final_info_has_the_schema_and_finite_values(two_runs):
    info = json.loads((two_runs[0] / "final_info.json").read_text())
    validate_final_info(info)
    block = info["shakespeare"]
    assert {"topk", "relu_l1", "t_sae", "crosscoder", "tsae"} <= set(block)
    for model in ("topk", "tsae"):
        for metric in ("fvu", "l0", "ce_score", "ce_delta", "kl", "tss", "tss_shuffled", "mean_lifetime",
                       "train_time_s", "train_tokens_per_s"):
            for stat in ("mean", "std"):
                assert math.isfinite(block[model][f"{metric}_{stat}"]), (model, metric, stat)
        assert any(k.startswith("probe_") for k in block[model])
        assert any(k.startswith("faithfulness_") for k in block[model])
    # measured on held-out tokens, not on nothing: a trained SAE beats the mean (smoke: topk 0.65,
    # tsae 0.57), TopK fixes L0 at the preset's k, a run lasts at least one position, training took time
    for model in ("topk", "tsae"):
        assert 0 < block[model]["fvu_mean"] < 1, (model, block[model]["fvu_mean"])
        assert block[model]["l0_mean"] == pytest.approx(8, abs=0.01)  # the smoke preset's k
        assert block[model]["mean_lifetime_mean"] >= 1
        assert block[model]["train_tokens_per_s_mean"] > 0 and block[model]["train_time_s_mean"] > 0


def test_figures_are_pngs_and_the_report_references_what_exists(two_runs):
    out = two_runs[0]
    figures = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"comparison.png", "training_evolution.png", "evolution_heatmap_0.png",
            "lifecycle_timeline_0.png"} <= names
    assert all(is_png(p) and p.stat().st_size > 2000 for p in figures)
    checked = check_report(out)
    assert any(p.name == "comparison.png" for p in checked)
    html = (out / "report.html").read_text()
    assert "Comparison with baselines" in html and "Caveats" in html


def test_every_sae_folder_holds_weights_log_and_metrics(two_runs):
    for folder in sorted((two_runs[0] / "saes").iterdir()):
        for name in ("cfg.json", "sae_weights.safetensors", "train_log.jsonl", "metrics.json"):
            assert (folder / name).is_file(), (folder, name)
    assert (two_runs[0] / "run.log").read_text().count("train   ") == 6


def test_the_second_run_reuses_the_cache_and_every_sae(two_runs):
    log = (two_runs[1] / "run.log").read_text()
    assert "cache hit" in log and "no activation recomputed" in log
    assert "trained 0 SAE(s), reused 6 identical SAE(s)" in log
    timings = json.loads((two_runs[1] / "timings.json").read_text())
    assert timings["train_s"] < 5 and timings["cache_s"] < 5
    first = json.loads((two_runs[0] / "final_info.json").read_text())["shakespeare"]
    second = json.loads((two_runs[1] / "final_info.json").read_text())["shakespeare"]
    assert first["tsae"]["fvu_mean"] == pytest.approx(second["tsae"]["fvu_mean"], rel=1e-6)


def test_bad_arguments_get_one_clear_line():
    r = subprocess.run([sys.executable, str(REPO / "experiment.py")], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--out_dir" in r.stderr


def test_an_empty_out_dir_is_refused_before_anything_is_written(tmp_path):
    """`--out_dir=` would resolve to the working directory: refused in one line, nothing written."""
    r = subprocess.run([sys.executable, str(REPO / "experiment.py"), "--out_dir=", "--smoke"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    expected = "error: --out_dir is empty: name the run folder, e.g. --out_dir=run_1"
    assert r.stderr.strip().splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []
