"""Untrusted files: nothing is ever unpickled, and a store name cannot reach outside the cache dir."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_compare import TINY

from pipeline.cache_runner import CacheConfig, build_cache
from pipeline.cli_cache import main
from pipeline.errors import StoreError
from pipeline.store import ActivationStore, remove
from pipeline.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def python_files() -> list[Path]:
    skip = {".venv", "venv", "cache", "build", "dist", ".git", "node_modules"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts[:-1])]


def unsafe_loads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every way this module could deserialise arbitrary objects."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            out += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = ast.unparse(node.func.value)
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if owner == "torch" and node.func.attr == "load" and const.get("weights_only") is not True:
            out.append((node.lineno, "torch.load without weights_only=True"))
        if owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in kw:
            if const.get("allow_pickle") is not False:
                out.append((node.lineno, "np.load(allow_pickle=...)"))
        if node.func.attr in ("read_pickle", "from_pickle", "unpickle"):
            out.append((node.lineno, node.func.attr))
        if owner == "yaml" and node.func.attr in ("load", "unsafe_load", "full_load"):
            if node.func.attr != "load" or "SafeLoader" not in ast.unparse(
                kw.get("Loader", ast.Constant(""))
            ):
                out.append((node.lineno, f"yaml.{node.func.attr}"))
    return out


def test_the_scanner_catches_every_pattern():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np, yaml, pandas as pd\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "pd.read_pickle('x')\nyaml.load(s)\n"
    )
    good = "import torch, numpy as np\ntorch.load('x', weights_only=True)\nnp.load('x')\n"
    assert len(unsafe_loads(ast.parse(bad))) == 7
    assert unsafe_loads(ast.parse(good)) == []


def test_no_source_file_unpickles_anything():
    files = python_files()
    assert len(files) > 50 and any(p.name == "store.py" for p in files)
    found = [
        f"{p.relative_to(ROOT)}:{line}: {what}"
        for p in files
        for line, what in unsafe_loads(ast.parse(p.read_text(encoding="utf-8"), str(p)))
    ]
    assert found == []


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    r = build_cache(CacheConfig(**{**TINY, "max_tokens": 32 * 16}, cache_dir=str(home)), model=tiny_model)
    return home, r.key


def test_names_that_leave_the_cache_dir_are_refused(built, tmp_path):
    home, key = built
    outside = tmp_path / "outside"
    shutil.copytree(home / key, outside / key)  # a real store, outside the cache dir
    (outside / "victim.txt").write_text("keep me")
    (home / "escape").symlink_to(outside / key, target_is_directory=True)
    (home / "models").mkdir(exist_ok=True)
    names = [
        "..",
        "../x",
        "../../etc",
        "/etc",
        str(outside / key),
        "a/b",
        ".",
        "",
        " ",
        "x\x00y",
        "escape",
        f"{key}/../..",
        f"../{home.name}/{key}/..",
    ]
    for cmd in ("info", "verify", "rm", "repair"):
        for name in names:
            res = CliRunner().invoke(main, [cmd, name, "--cache-dir", str(home)])
            errors = res.stderr.strip().splitlines()
            assert res.exit_code == 2 and len(errors) == 1, (cmd, name, res.output)
            verb = {"info": "show", "rm": "remove"}.get(cmd, cmd)
            assert errors[0].startswith(f"error: refusing to {verb}"), errors
    res = CliRunner().invoke(main, ["export", "../x", str(tmp_path / "o.h5"), "--cache-dir", str(home)])
    assert res.exit_code == 2 and res.stderr.startswith("error: refusing to export")
    for name in ("models", "nonexistent"):  # inside, but no store: nothing is removed
        res = CliRunner().invoke(main, ["rm", name, "--cache-dir", str(home)])
        assert res.exit_code == 2 and "no activation store" in res.stderr
    with pytest.raises(StoreError, match="refusing to remove"):
        remove("../outside", home)
    assert (outside / "victim.txt").read_text() == "keep me" and (outside / key / "zarr.json").exists()
    assert (home / "models").is_dir() and (home / key / "zarr.json").exists()
    # the same store named by key, or by a path directly under the cache dir, is served
    for name in (key, str(home / key)):
        res = CliRunner().invoke(main, ["info", name, "--cache-dir", str(home)])
        assert res.exit_code == 0 and json.loads(res.stdout)["key"] == key


def test_a_store_declaring_a_codec_we_do_not_read_is_refused(built, tmp_path):
    home, key = built
    store = tmp_path / "cache" / key
    shutil.copytree(home / key, store)
    meta_path = store / "acts" / "blocks.1.hook_resid_post" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {}}]  # would unpickle each chunk
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError):
        s = ActivationStore.open(store)
        s.read([0], s.hooks[0])
    assert verify_store(store).structural
