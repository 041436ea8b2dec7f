"""Every figure function writes a real, non-trivial PNG from synthetic inputs and rejects bad input."""

import json
import struct

import numpy as np
import pytest

from tsae.analysis.ablation_plots import as_stats, plot_model_comparison, plot_window_ablation
from tsae.analysis.evolution import plot_feature_heatmap, plot_lifecycle, run_intervals, top_features
from tsae.analysis.plotting import is_png, tex_safe
from tsae.analysis.training_curves import load_log, phase_spans, plot_training_curves, series
from tsae.analysis.transition_graph import component_order, plot_transition_graph, spring_layout
from tsae.analysis.transitions import mine_transitions
from tsae.data.synthetic import generate


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    assert is_png(path)
    data = path.read_bytes()
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_real_png(path, min_bytes=8000, min_side=300):
    w, h = png_size(path)
    assert min(w, h) >= min_side and path.stat().st_size >= min_bytes


@pytest.fixture(scope="module")
def passage():
    data = generate(n_seq=2, seq_len=40, n_feat=48, seed=0)
    rng = np.random.default_rng(0)
    static = data.codes[0] * (rng.random(data.codes[0].shape) < 0.5)  # same features, fragmented runs
    tokens = [" the", " cat", "\n", " $5", " sat"] * 8
    return {"static": static, "tsae": data.codes[0]}, tokens


def test_heatmap_and_lifecycle(tmp_path, passage):
    panels, tokens = passage
    assert_real_png(plot_feature_heatmap(panels, tokens, tmp_path / "heat.png", top=12, title="passage 0"))
    labels = {"tsae": {int(f): "cats" for f in range(48)}}
    assert_real_png(plot_lifecycle(panels, tokens, tmp_path / "life.png", feature_labels=labels))
    with pytest.raises(ValueError, match="tokens"):
        plot_lifecycle(panels, tokens[:-1], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_feature_heatmap(panels, tokens, tmp_path / "heat.pdf")


def test_top_features_and_runs():
    codes = np.zeros((6, 4), dtype=np.float32)
    codes[3:, 0] = 1.0  # total 3, starts at 3
    codes[0:2, 2] = 2.0  # total 4, starts at 0
    codes[5, 3] = 0.5  # total 0.5
    assert top_features(codes, 2).tolist() == [2, 0]  # the two largest, ordered by first activation
    assert top_features(codes, 10).tolist() == [2, 0, 3]  # never-active feature 1 dropped
    assert run_intervals(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)) == [(0, 2), (3, 4), (6, 7)]
    assert tex_safe("a$b\n") == r"a\$b\n" and len(tex_safe("x" * 40)) == 14


def write_log(path):
    lines = []
    for step in range(120):
        rec = {"tokens": step * 1000, "loss": 2.0 / (1 + step), "mse": 1.0 / (1 + step),
               "dead_frac": 0.2 * np.exp(-step / 30), "phase": 1 + step // 40}
        if step % 7:
            rec["l0"] = 30 + 10 * np.exp(-step / 20)
        if step >= 40:
            rec["gate_mean"] = 0.5 * (1 - np.exp(-(step - 40) / 20))
        lines.append(json.dumps(rec))
        if step in (40, 80):
            lines.append(json.dumps({"tokens": step * 1000, "event": "phase_start"}))
    lines.append('{"tokens": 120000, "loss": 0.')  # a torn last line
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_training_curves(tmp_path):
    recs = load_log(write_log(tmp_path / "log.jsonl"))
    assert len(recs) == 122
    assert phase_spans(recs) == [(1, 0, 40000), (2, 40000, 80000), (3, 80000, 119000)]
    x, y = series(recs, "l0")
    assert len(x) == 120 - 18 and np.isfinite(y).all()  # missing keys skipped
    assert_real_png(plot_training_curves(recs, tmp_path / "curves.png", title="tsae"))
    other = [{"step": i, "loss": 1.0 / (i + 1), "l0": float("nan")} for i in range(50)]  # x = step, no l0
    assert_real_png(plot_training_curves({"tsae": recs, "topk": other}, tmp_path / "both.png"))
    with pytest.raises(ValueError, match="no plottable"):
        plot_training_curves([{"event": "start"}], tmp_path / "empty.png")


def test_window_ablation_and_comparison(tmp_path):
    ws = (1, 4, 8, 16, 32)
    results = {w: {"fvu": (0.2 - 0.01 * np.log2(w), 0.01), "mean_lifetime": (1 + np.log2(w), 0.2), "l0": 32.0}
               for w in ws}
    refs = {"topk": {"fvu_mean": 0.21, "fvu_std": 0.005, "mean_lifetime_mean": 1.2, "mean_lifetime_std": 0.1}}
    assert as_stats(refs["topk"]) == {"fvu": (0.21, 0.005), "mean_lifetime": (1.2, 0.1)}
    assert as_stats({"l0": 3}) == {"l0": (3.0, 0.0)}
    assert_real_png(plot_window_ablation(results, tmp_path / "abl.png", references=refs,
                                         better={"fvu": "lower"}))
    models = {"topk": refs["topk"], "tsae": results[8], "relu_l1": {"fvu": (0.3, 0.02)}}
    assert_real_png(plot_model_comparison(models, tmp_path / "cmp.png", title="matched L0 = 32"))
    with pytest.raises(ValueError, match="no metrics"):
        plot_model_comparison({"a": {}}, tmp_path / "none.png")


def test_transition_graph(tmp_path):
    data = generate(n_seq=128, seq_len=48, n_feat=32, n_follow_pairs=5, seed=1)
    top = mine_transitions(data.active, events="onset").top(n=20)
    assert top
    assert_real_png(plot_transition_graph(top, tmp_path / "g.png", labels={t.A: " the" for t in top}))
    assert_real_png(plot_transition_graph([t.as_dict() for t in top], tmp_path / "s.png", layout="spring"))
    with pytest.raises(ValueError, match="layout"):
        plot_transition_graph(top, tmp_path / "x.png", layout="grid")


def test_layouts():
    assert component_order(5, [(0, 3), (3, 4), (1, 2)]) == [0, 3, 4, 1, 2]
    pos = spring_layout(6, [(0, 1, 1.0), (1, 2, 1.0), (3, 4, 2.0)], seed=0)
    assert pos.shape == (6, 2) and np.abs(pos).max() <= 1 + 1e-9
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert d[3, 4] < np.median(d[np.triu_indices(6, 1)])  # linked nodes sit closer than a typical pair
