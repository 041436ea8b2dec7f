"""tsae-cache: the happy path, and every bad input ending in one `error:` line without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.cli_cache import main
from pipeline.store import list_stores

TINY = ["--model", "tiny", "--ctx", "32", "--chunk-seqs", "8", "--batch-size", "4", "--no-progress"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(res, *fragments, code=None):
    """Non-zero exit, exactly one `error:` line on stderr holding every fragment, no traceback."""
    assert res.exit_code != 0 if code is None else res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), res.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


def test_build_ls_info_hit_rm(tmp_cache_dir):
    res = run("build", *TINY, "--layers", "0,1", "--max-tokens", "480", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["hit"] and out["n_seq"] == 15 and out["key"].startswith("tiny_L0-1_ctx32_")

    ls = run("ls").stdout
    assert out["key"] in ls and "complete" in ls and "blocks.0.hook_resid_post,blocks.1.hook_resid_post" in ls
    info = json.loads(run("info", out["key"]).stdout)
    assert info["n_seq"] == 15 and info["ctx"] == 32 and info["store_dtype"] == "float16"
    assert info["stats"]["blocks.1.hook_resid_post"]["mean"].startswith("[64 numbers")
    assert info["versions"]["zarr"] and info["dataset"]["dataset"] == "shakespeare"

    again = run("build", *TINY, "--layers", "0,1", "--max-tokens", "480", "--batch-size", "2")
    assert again.exit_code == 0 and again.stdout.startswith(f"cache hit: {out['key']}")
    assert run("verify", out["key"]).stdout.startswith(f"ok: {out['key']}: 2 chunks, 15 sequences")
    assert run("rm", out["key"]).exit_code == 0 and list_stores() == []
    assert "no stores" in run("ls").stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "no-such-model-xyz"], ["unknown or unreachable model", "smollm2-135m, tiny"]),
        ([*TINY, "--layers", "2"], ["layer 2 out of range", "2 layers"]),
        ([*TINY, "--ctx", "256"], ["ctx 256 exceeds", "n_ctx=128"]),
        ([*TINY, "--hook", "blocks.0.hook_nonsense"], ["unknown hook"]),
        ([*TINY, "--hook", "blocks.0.attn.hook_pattern"], ["shape"]),
        ([*TINY, "--max-tokens", "lots"], ["--max-tokens"]),
        ([*TINY, "--store-dtype", "bfloat16"], ["cannot store bfloat16"]),
        ([*TINY, "--dtype", "fp8"], ["--dtype"]),
        ([*TINY, "--layers", "a,b"], ["--layers"]),
        ([*TINY, "--split", "nope"], ["unknown split"]),
        ([*TINY, "--dataset", "/no/such/corpus.txt"], ["no such file"]),
        (["--bogus-option"], ["No such option"]),
    ],
)
def test_bad_build_options(tmp_cache_dir, args, fragments):
    assert_one_error(run("build", *args), *fragments)
    assert list_stores() == []


def test_bad_corpora_leave_no_store(tmp_cache_dir, tmp_path):
    empty, short, bad = tmp_path / "empty", tmp_path / "short", tmp_path / "bad"
    for d in (empty, short, bad):
        d.mkdir()
    (empty / "a.txt").write_text("   \n")
    (short / "a.txt").write_text("To be, or not to be.")
    (bad / "a.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3\x28")
    assert_one_error(run("build", *TINY, "--dataset", empty, "--split", "all"), "holds no usable text")
    assert_one_error(run("build", *TINY, "--dataset", short, "--split", "all"), "shorter than one sequence")
    res = run("build", *TINY, "--dataset", bad, "--split", "all")
    assert_one_error(res, "holds no usable text")
    assert "warning: skipping" in res.stderr and "a.txt" in res.stderr and "UnicodeDecodeError" in res.stderr
    assert list_stores() == [] and sorted(p.name for p in tmp_cache_dir.iterdir()) == ["models"]


def test_unwritable_cache_dir_and_rm_outside(tmp_cache_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_one_error(run("build", *TINY, "--cache-dir", blocker / "cache"), "not writable")
    assert_one_error(run("build", *TINY, "--cache-dir", blocker), "is a file, not a directory")
    assert_one_error(run("rm", tmp_path), "refusing to remove", "not a store directly under the cache dir")
    assert_one_error(run("rm", "tiny_L1_ctx32_000000000000"), "no activation store")
    assert_one_error(run("info", "tiny_L1_ctx32_000000000000"), "no activation store")
    assert_one_error(run("verify", "tiny_L1_ctx32_000000000000"), "no activation store")
    assert_one_error(run("export", "tiny_L1_ctx32_000000000000", tmp_path / "x.h5"), "no activation store")


def test_help_and_listing_do_not_import_torch(tmp_cache_dir):
    for cmd in (["--help"], ["build", "--help"], ["ls"]):
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pipeline.cli_cache", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0 and time.perf_counter() - t < 5
        imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines()}
        assert not imported & {"torch", "transformer_lens", "transformers", "zarr"}, cmd
    # a real process: bad input gives exit 2 and one line, no traceback
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.cli_cache", "build", "--model", "tiny", "--layers", "7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.strip() == "error: layer 7 out of range: tiny has 2 layers (0-1)"
