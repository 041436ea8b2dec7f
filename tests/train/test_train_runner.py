"""Training from a real store (tiny model) end to end: loadable SAEs that reconstruct held-out data."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.store import ActivationStore
from pipeline.train_runner import TrainRunConfig, main, run_training
from tsae.models.registry import load_sae


@pytest.fixture
def store(tiny_model, tmp_cache_dir, tmp_path):
    """A store of 96 sequences of 32 tokens from ~40 documents (Shakespeare paragraphs), so the
    document-level held-out split is meaningful."""
    from pipeline.sources import iter_documents

    text = next(iter(iter_documents("shakespeare"))).text
    docs = [text[i : i + 900] for i in range(0, 900 * 48, 900)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = CacheConfig(model="tiny", dataset=str(src), split="all", ctx=32, max_tokens=32 * 96, chunk_seqs=8,
                      batch_size=8, progress=False, cache_dir=str(tmp_cache_dir))
    return ActivationStore.open(build_cache(cfg, model=tiny_model).key, str(tmp_cache_dir))


def held_out_fvu(sae, store, skip=1) -> float:
    _, val = store.split(0.1, 0)
    x, _ = store.read(val, store.hooks[0])
    x = torch.from_numpy(x)
    with torch.no_grad():
        x_hat = sae(x).x_hat
    x, x_hat = x[:, skip:], x_hat[:, skip:]
    return float((x - x_hat).pow(2).sum() / (x - x.mean((0, 1))).pow(2).sum())


STATIC = {"d_sae": 128, "k": 8, "n_tokens": 40_000, "batch_windows": 32, "window": 8, "lr": 3e-3,
          "log_every": 20, "progress": False, "dead_window_tokens": 5_000}


def test_static_topk_from_store(store, tmp_path):
    out = tmp_path / "topk"
    res = run_training(TrainRunConfig(store=store.key, cache_dir=str(store.location.parent), out_dir=str(out),
                                      static=STATIC))
    sae = load_sae(out)
    assert sae.cfg.hook_name == store.hooks[0] and sae.cfg.model_name == store.attrs["model"]["name"]
    fvu = held_out_fvu(sae, store)
    assert fvu < 0.5, fvu  # measured 0.31 (tiny model, layer-1 residual, k=8, d_sae=128, 40k tokens)
    # position 0 (BOS) was left out, and the run records it
    run = json.loads((out / "run_cfg.json").read_text())
    assert run["skip_positions"] == 1
    assert json.loads((out / "trainer_cfg.json").read_text())["skip_positions"] == 1
    assert res.loop.state["tokens"] == 40_000
    # a finished run is not silently overwritten
    assert main(["--store", str(store.location), "--out", str(out)]) == 2


def test_tsae_from_store_with_static_pretraining(store, tmp_path):
    out = tmp_path / "tsae"
    tsae = {"k": 8, "distill_tokens": 4_000, "introduce_tokens": 8_000, "refine_tokens": 8_000,
            "memory_window": 4, "lstm_hidden": 16, "batch_windows": 16, "window": 16, "lr": 1e-3,
            "log_every": 10, "progress": False, "dead_window_tokens": 5_000}
    run_training(TrainRunConfig(store=str(store.location), out_dir=str(out), architecture="tsae",
                                static=STATIC, tsae=tsae))
    static, sae = load_sae(out / "static"), load_sae(out)
    assert sae.architecture == "tsae" and static.architecture == "topk"
    fvu_static, fvu_tsae = held_out_fvu(static, store), held_out_fvu(sae, store)
    assert fvu_tsae < 0.5 and fvu_tsae < fvu_static * 1.1, (fvu_tsae, fvu_static)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in log if "event" not in r]
    assert phases[0] == "distill" and phases[-1] == "refine" and "introduce" in phases
    ckpts = {p.name for p in (out / "checkpoints").iterdir()}
    assert {"phase_distill", "phase_introduce", "phase_refine"} <= ckpts


def test_cli_bad_inputs_are_one_line(store, tmp_path, capsys):
    assert main(["--store", "no-such-store", "--out", str(tmp_path / "x")]) == 2
    assert main(["--store", str(store.location), "--out", str(tmp_path / "x"), "--set", "bogus=1"]) == 2
    assert main(["--store", str(store.location), "--out", str(tmp_path / "x"), "--hook", "nope"]) == 2
    assert main(["--store", str(store.location), "--out", str(tmp_path / "y"), "--arch", "tsae",
                 "--static-sae", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


@pytest.mark.parametrize("args, message", [
    (["--set", "k=-3"], "StaticTrainerConfig.k must be > 0, got -3"),
    (["--set", "k=abc"], "StaticTrainerConfig.k must be an integer, got 'abc'"),
    (["--set", "lr=-1"], "StaticTrainerConfig.lr must be > 0"),
    (["--set", "n_tokens=0"], "StaticTrainerConfig.n_tokens must be > 0"),
    (["--set", "lr_decay_frac=2"], "lr_decay_frac must be in [0, 1]"),
    (["--set", "progress=1"], "progress must be true or false"),
    (["--val-fraction", "1.5"], "val_fraction must be in (0, 1)"),
    (["--arch", "tsae", "--set", "memory_window=0"], "TSAETrainerConfig.memory_window must be > 0"),
    (["--arch", "tsae", "--set", "distill_tokens=0", "--set", "introduce_tokens=0",
      "--set", "refine_tokens=0"], "must be > 0"),
])
def test_bad_trainer_values_are_one_line_and_write_nothing(store, tmp_path, capsys, args, message):
    """Values that would crash deep in training (a traceback) or train nothing are refused first."""
    out = tmp_path / "out"
    assert main(["--store", str(store.location), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_integral_floats_are_accepted_for_integer_fields(store, tmp_path):
    out = tmp_path / "out"
    assert main(["--store", str(store.location), "--out", str(out), "--set", "n_tokens=2e3",
                 "--set", "k=4", "--set", "batch_windows=4", "--set", "window=8", "--set", "d_sae=64"]) == 0
    assert json.loads((out / "trainer_cfg.json").read_text())["n_tokens"] == 2000
