"""Bad input never gives a traceback: fuzzed `tsae-cache` options, text files and store metadata.

Every run must end with exit 0, or with exactly one `error: ...` line and a non-zero status (warnings
and verify's `problem:` lines may precede it); a store that a run leaves complete must verify.  The
CLI runs in-process (click's CliRunner) in an isolated working directory; loads of the tiny model
reuse the session's instance, every other model spec goes to the real loader.  Examples are
derandomised (reproducible); TSAE_FUZZ_EXAMPLES=500 TSAE_FUZZ_RANDOM=1 runs a longer, fresh hunt.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from pipeline import models
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.store import ActivationStore, list_stores
from pipeline.verify import verify_store

FUZZ = settings(
    max_examples=int(os.environ.get("TSAE_FUZZ_EXAMPLES", "30")),  # more for a longer hunt
    deadline=None,
    derandomize="TSAE_FUZZ_RANDOM" not in os.environ,  # CI: the same examples every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 40


@pytest.fixture
def cli(tiny_model, tmp_cache_dir, tmp_path, monkeypatch):
    """Runs `tsae-cache ARGS` in an isolated directory; returns (result, error lines).  The default
    cache home is isolated too (`tmp_cache_dir`): a fuzzed ``--cache-dir ""`` means the default,
    which was the repository's own ``cache/`` (each run left a store there)."""
    real = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda spec="", *a, **k: tiny_model if spec == "tiny" else real(spec, *a, **k)
    )
    monkeypatch.chdir(tmp_path)

    def run(*args):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert "Traceback" not in res.output, res.output
        errors = [line for line in res.stderr.splitlines() if not line.startswith(("warning:", "problem:"))]
        if res.exit_code == 0:
            assert errors == [], res.stderr
        else:
            assert res.exit_code in (1, 2) and len(errors) == 1 and errors[0].startswith("error: "), (
                res.exit_code,
                res.stderr,
            )
        return res, errors

    return run


def base(cache_dir, dataset) -> dict[str, str]:
    return {
        "--model": "tiny",
        "--ctx": "16",
        "--max-tokens": "96",
        "--dataset": str(dataset),
        "--split": "all",
        "--chunk-seqs": "2",
        "--batch-size": "2",
        "--cache-dir": str(cache_dir),
    }


def check_built(res) -> None:
    """A successful build names a store that verifies."""
    line = res.stdout.strip().split("\n")[-1]  # not splitlines(): a fuzzed path may hold a \r
    assert line.startswith(("built ", "cache hit: ")), line
    location = line.rsplit(" at ", 1)[1]
    assert verify_store(location).ok


# ----------------------------------------------------------------------------------- CLI options
junk = st.one_of(
    st.text(max_size=40),
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(["", " ", "0", "-1", "1e999", "nan", "inf", "3,,1", "1,-2", "0x10", "2k", "1.5M", "all"]),
)
small = st.integers(1, 12).map(str)  # valid values, so that many examples really build
option_values = {
    "--ctx": st.one_of(junk, st.integers(2, 130).map(str)),
    "--layers": st.one_of(
        junk, st.lists(st.integers(-3, 4), max_size=3).map(lambda x: ",".join(map(str, x)))
    ),
    "--max-tokens": st.one_of(junk, st.sampled_from(["16", "100", "1k", "1e6", "all"])),
    "--dtype": st.one_of(junk, st.sampled_from(["float32", "bfloat16", "float16", "float64", "int8"])),
    "--store-dtype": st.one_of(junk, st.sampled_from(["float16", "float32", "bfloat16"])),
    "--dataset": st.one_of(
        junk, st.sampled_from(["./nope.txt", "/nonexistent/x.jsonl", ".", "..", "data", "corpus.txt"])
    ),
    "--cache-dir": st.one_of(
        st.text(st.characters(blacklist_characters="/\\~\x00", blacklist_categories=["Cs"]), max_size=300),
        st.sampled_from(["memory://fuzz", "file://relative", "corpus.txt", "."]),
    ),
    "--chunk-seqs": st.one_of(junk, small),
    "--batch-size": st.one_of(junk, small),
    "--model": st.one_of(
        junk, st.sampled_from(["tiny:d_model=0", "tiny:n_layers=x", "tiny:zz=1", "./none", "tiny"])
    ),
}


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(option_values)), st.just(None), min_size=1, max_size=3), st.data()
)
def test_fuzzed_build_options(cli, tmp_path, keys, data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    opts = base("cache", corpus)
    for k in keys:
        opts[k] = data.draw(option_values[k], label=k)
    res, errors = cli("build", *[x for kv in opts.items() for x in kv], "--no-progress")
    event(f"exit {res.exit_code}: {(errors or [''])[0][:60]}")
    if res.exit_code == 0:
        check_built(res)


# ----------------------------------------------------------------------------------- text inputs
files = st.one_of(
    st.binary(max_size=3000).map(lambda b: ("x.txt", b)),
    st.binary(max_size=3000).map(lambda b: ("x.jsonl", b)),
    st.text(max_size=3000).map(lambda t: ("x.txt", t.encode("utf-8", "surrogatepass"))),
    st.lists(
        st.dictionaries(
            st.sampled_from(["text", "body", ""]),
            st.one_of(st.text(max_size=300), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
        ),
        max_size=5,
    ).map(lambda rows: ("x.jsonl", "\n".join(json.dumps(r) for r in rows).encode())),
)


@FUZZ
@given(files)
@example(("x.txt", b""))
@example(("x.txt", b"word " * 60_000))  # one 300 kB line
@example(("x.txt", ("caf\xe9 " * 500).encode("latin-1")))  # not UTF-8
@example(("x.txt", b"\x00\xff" * 2000))
@example(("x.jsonl", b'{"text": "' + b"a " * 5000 + b'"}\n{"text": 5}\n{bad json'))
def test_fuzzed_text_files(cli, tmp_path, named):
    name, raw = named
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    (src / name).write_bytes(raw)
    res, _ = cli("build", *[x for kv in base("cache", src / name).items() for x in kv], "--no-progress")
    if res.exit_code == 0:
        check_built(res)


# ----------------------------------------------------------------------------------- store metadata
@pytest.fixture(scope="module")
def pristine(tiny_model, tmp_path_factory):
    from pipeline.cache_runner import CacheConfig, build_cache

    home = tmp_path_factory.mktemp("pristine")
    src = home / "corpus.txt"
    src.write_text(TEXT)
    cfg = CacheConfig(
        model="tiny",
        ctx=16,
        max_tokens=96,
        dataset=str(src),
        split="all",
        chunk_seqs=2,
        batch_size=2,
        progress=False,
        cache_dir=str(home),
    )
    r = build_cache(cfg, model=tiny_model)
    return Path(r.location), src


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
METADATA = ["zarr.json", "manifest.json", "tokens/zarr.json", "acts/blocks.1.hook_resid_post/zarr.json"]


def mutate(doc, data, depth: int = 0):
    """Replace or delete one value somewhere in a parsed JSON document."""
    if isinstance(doc, (dict, list)) and doc and depth < 6 and data.draw(st.booleans()):
        keys = sorted(doc) if isinstance(doc, dict) else list(range(len(doc)))
        k = data.draw(st.sampled_from(keys))
        if data.draw(st.integers(0, 3)) == 0:
            del doc[k]
        else:
            doc[k] = mutate(doc[k], data, depth + 1)
        return doc
    return data.draw(json_values)


@FUZZ
@given(
    st.sampled_from(METADATA),
    st.sampled_from(["mutate", "mutate", "garbage", "truncate", "delete"]),
    st.data(),
)
def test_fuzzed_store_metadata(cli, pristine, tmp_path, target, how, data):
    location, src = pristine
    home = tmp_path / "damaged"
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(location.parent, home, ignore=shutil.ignore_patterns("models"))
    store = home / location.name
    path = store / target
    raw = path.read_bytes()
    if how == "mutate":
        path.write_text(json.dumps(mutate(json.loads(raw), data)))
    elif how == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=200)))
    elif how == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    else:
        path.unlink()

    key = location.name
    cli("ls", "--cache-dir", home)
    cli("info", key, "--cache-dir", home)
    cli("verify", key, "--cache-dir", home)
    cli("export", key, tmp_path / "out.h5", "--overwrite", "--cache-dir", home)
    res, _ = cli("build", *[x for kv in base(home, src).items() for x in kv], "--no-progress")
    cli("repair", key, "--cache-dir", home)
    try:  # the library API raises StoreError only, and reads nothing damaged
        s = ActivationStore.open(key, home)
        s.read(list(range(s.n_seq)), s.hooks[0])
    except StoreError:
        pass
    list_stores(home)
    cli("rm", key, "--cache-dir", home)


# ------------------------------------------------------------------------------ unreachable stores
@pytest.mark.parametrize(
    "command",
    [["ls"], ["info", "k"], ["verify", "k"], ["rm", "k"], ["repair", "k"], ["export", "k", "o.h5"],
     ["build", *[x for kv in base("-", "corpus.txt").items() if kv[0] != "--cache-dir" for x in kv]]],
    ids=lambda c: c[0],
)
def test_s3_cache_dir_without_a_server(cli, tmp_path, monkeypatch, command):
    """An s3:// cache dir whose server does not answer: one line naming what could not be reached
    (the S3 client's errors are not OSErrors; they escaped as tracebacks)."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # an earlier test's client may know another server
    res, errors = cli(*command, "--cache-dir", "s3://nobucket/home")
    assert res.exit_code == 2 and errors[0].startswith("error: cannot reach "), errors


def test_ls_of_a_file_as_cache_dir(cli, tmp_path):
    """``--cache-dir`` naming a file: ls said 'no stores in ...' and exited 0."""
    (tmp_path / "afile").write_text("x")
    res, errors = cli("ls", "--cache-dir", "afile")
    assert res.exit_code == 2 and "not a directory" in errors[0], errors
