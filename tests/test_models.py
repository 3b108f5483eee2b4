"""Model loading: embedded model, local Hugging Face directories as users have them, the hub cache,
offline tokenizers, and one clear error (cause kept) for each way loading can fail.

References are independent of circuitlib: a loaded model's logits must equal transformers' own
forward pass on the same weights.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuitlib.models import (
    ModelUnavailableError,
    gpt2_tokenizer,
    load_model,
    load_tokenizer,
    model_identity,
)

TOKENS = [15496, 995, 11, 1049, 318, 257, 1332, 13]  # "Hello world, this is a test."
N_POS = 64

# gpt2-medium's config.json as the hub serves it (no transformers_version, n_ctx present); the tests
# shrink the shape keys only.
GPT2_MEDIUM_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
    "n_layer": 24, "n_positions": 1024, "n_special": 0, "predict_special_tokens": True, "resid_pdrop": 0.1,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
SMALL = {"n_ctx": N_POS, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": N_POS}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_offline_gpt2_tokenizer_matches_gpt2_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Paris", add_special_tokens=False) == [6342]
    assert tok.bos_token_id == tok.eos_token_id == 50256
    assert len(tok.get_vocab()) == 50257


@pytest.mark.parametrize("name", ["gpt2", "gpt2-small", "gpt2-medium", "distilgpt2"])
def test_gpt2_family_tokenizer_loads_offline(name):
    assert load_tokenizer(name).encode("Hello world") == [15496, 995]


# ---------------------------------------------------------------------------------------------
# Local directories in the formats transformers 4 and 5 write


@pytest.fixture(scope="module")
def hf_gpt2():
    """A random GPT-2 (transformers' own implementation) with gpt2-medium's config values, small shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    values = {k: v for k, v in GPT2_MEDIUM_CONFIG.items() if k not in ("architectures", "n_ctx")}
    cfg = GPT2Config(**{**values, **{k: v for k, v in SMALL.items() if k != "n_ctx"}})
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorm weights away from 1 / 0, so unprocessed vs folded differ visibly
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
    return model


def _reference_logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([TOKENS])).logits


def _weights(hf, *, prefix: bool = True, buffers: bool = False, lm_head: bool = False) -> dict:
    """The state dict as a given transformers version saves it (keys with / without 'transformer.')."""
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if not lm_head:
        state.pop("lm_head.weight")  # tied to wte: transformers drops it from safetensors files
    if buffers:  # GPT-2's causal-mask buffers, as in the 2019 hub checkpoints
        for i in range(hf.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return state


def _tf4_config(hf, *, n_ctx: bool) -> dict:
    # Exactly the keys transformers 4.57 writes for this config (checked against a real 4.57.1 run).
    keep = ("activation_function", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
            "initializer_range", "layer_norm_epsilon", "model_type", "n_embd", "n_head", "n_inner", "n_layer",
            "n_positions", "reorder_and_upcast_attn", "resid_pdrop", "scale_attn_by_inverse_layer_idx",
            "scale_attn_weights", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
            "summary_type", "summary_use_proj", "use_cache", "vocab_size")
    c = hf.config.to_dict()
    cfg = {"architectures": ["GPT2LMHeadModel"], "dtype": "float32", "transformers_version": "4.57.1",
           **{k: c.get(k) for k in keep}}
    if n_ctx:
        cfg["n_ctx"] = N_POS
    return dict(sorted(cfg.items()))


def write_layout(hf, path: Path, layout: str, *, tokenizer: bool = True) -> Path:
    """A model directory as users have it. Layouts:

    tf5 / tf5_n_ctx: transformers 5 ``save_pretrained`` (config without / with ``n_ctx``);
    tf4_safetensors / tf4_bin: transformers 4 ``save_pretrained`` (safetensors; ``safe_serialization=False``);
    hub_bin: the old hub checkpoint style (``pytorch_model.bin`` in torch's legacy format, keys without
    the ``transformer.`` prefix, mask buffers, gpt2-medium's config.json values).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if layout in ("tf5", "tf5_n_ctx"):
        if layout == "tf5_n_ctx":
            hf.config.n_ctx = N_POS  # as in a config loaded from the hub
        try:
            hf.save_pretrained(path)
        finally:
            if layout == "tf5_n_ctx":
                del hf.config.n_ctx
        assert ("n_ctx" in json.loads((path / "config.json").read_text())) == (layout == "tf5_n_ctx")
    elif layout == "tf4_safetensors":
        (path / "config.json").write_text(json.dumps(_tf4_config(hf, n_ctx=False), indent=2))
        save_file(_weights(hf), str(path / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "tf4_bin":
        (path / "config.json").write_text(json.dumps(_tf4_config(hf, n_ctx=True), indent=2))
        torch.save(_weights(hf, lm_head=True), path / "pytorch_model.bin")
    elif layout == "hub_bin":
        (path / "config.json").write_text(json.dumps({**GPT2_MEDIUM_CONFIG, **SMALL}, indent=2))
        torch.save(_weights(hf, prefix=False, buffers=True), path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=False)
    else:
        raise ValueError(layout)
    if tokenizer:
        gpt2_tokenizer().save_pretrained(path)
    return path


LAYOUTS = ["tf5", "tf5_n_ctx", "tf4_safetensors", "tf4_bin", "hub_bin"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_directory_loads_with_transformers_logits(hf_gpt2, tmp_path, layout):
    path = write_layout(hf_gpt2, tmp_path / layout, layout)
    model = load_model(str(path))
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))
    ref = _reference_logits(hf_gpt2)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert model.cfg.n_ctx == N_POS  # from n_ctx, or n_positions when transformers 5 wrote no n_ctx
    assert model.cfg.model_name == model.cfg.tokenizer_name == str(path)
    assert model.tokenizer.encode("Hello world", add_special_tokens=False) == [15496, 995]


def test_processed_weights_keep_predictions(hf_gpt2, tmp_path):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf5")
    model = load_model(str(path), processed=True)
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))
    ref = _reference_logits(hf_gpt2)
    # centring the unembedding shifts every logit of a position by the same amount
    ours, ref = ours - ours.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_unprocessed_is_default(hf_gpt2, tmp_path):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf5")
    model = load_model(str(path))
    # Unprocessed: LayerNorm weights are kept (not folded to ones), as MAPS reads them.
    assert torch.allclose(model.blocks[0].ln1.w, hf_gpt2.transformer.h[0].ln_1.weight)


def test_loading_prints_nothing_to_stdout(hf_gpt2, tmp_path, capfd):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf5")
    capfd.readouterr()
    load_model(str(path))
    assert capfd.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub cache, offline


def write_hub_cache(hf, hf_home: Path, repo: str = "gpt2-medium", *, tokenizer: bool = True) -> Path:
    """``$HF_HOME/hub/models--<repo>/`` as huggingface_hub lays it out: blobs, snapshots/<commit> of
    symlinks to them, refs/main naming the commit. Weights as the hub's model.safetensors (base-model
    keys, no 'transformer.' prefix)."""
    from safetensors.torch import save_file

    staging = hf_home / "staging"
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps({**GPT2_MEDIUM_CONFIG, **SMALL}, indent=2))
    save_file(_weights(hf, prefix=False), str(staging / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        gpt2_tokenizer().save_pretrained(staging)
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(staging.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    return snapshot


HUB_SCRIPT = """
import json, sys, time, torch
from circuitlib.models import ModelUnavailableError, load_model, load_tokenizer
model = load_model("gpt2-medium")
with torch.no_grad():
    logits = model(torch.tensor([%r]))[0].tolist()
out = {"logits": logits, "name": model.cfg.model_name, "ids": model.tokenizer.encode("Hello world"),
       "tok_ids": load_tokenizer("gpt2-medium").encode("Hello world"), "n_layers": model.cfg.n_layers}
t = time.time()
try:
    load_model("gpt2-large")
except ModelUnavailableError as exc:
    out["missing"], out["missing_s"] = str(exc), time.time() - t
sys.stdout.write(json.dumps(out))
""" % (TOKENS,)


@pytest.mark.parametrize("tokenizer_files", [True, False])
def test_hub_cache_loads_gpt2_medium_offline(hf_gpt2, tmp_path, tokenizer_files):
    """load_model("gpt2-medium") in a fresh process with HF_HOME pointing at a filled cache and hub
    access off: the cached weights load (transformers' logits), GPT-2's offline tokenizer stands in
    when the cache holds no tokenizer files, and a model missing from the cache fails at once."""
    write_hub_cache(hf_gpt2, tmp_path, tokenizer=tokenizer_files)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)  # also: nothing but the script's JSON on stdout
    ref = _reference_logits(hf_gpt2)[0]
    assert torch.allclose(torch.tensor(out["logits"]), ref, atol=1e-4)
    assert out["name"] == "gpt2-medium" and out["n_layers"] == SMALL["n_layer"]
    assert out["ids"] == out["tok_ids"] == [15496, 995]
    assert "'gpt2-large' is not in the Hugging Face cache" in out["missing"]
    assert "HF_HUB_OFFLINE=1" in out["missing"] and "\n" not in out["missing"]
    assert out["missing_s"] < 2


def test_no_network_and_no_cache_fails_fast(tmp_path, monkeypatch):
    """Hub access on but the endpoint unreachable (a closed local port): one error, no retries."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t = time.time()
    with pytest.raises(ModelUnavailableError) as exc:
        load_model("gpt2-medium")
    assert time.time() - t < 5
    msg = one_line(exc)
    assert "not in the Hugging Face cache" in msg and "127.0.0.1:9 unreachable" in msg
    assert "ConnectionRefusedError" in msg and "Offline options" in msg


def test_hub_offline_names_offline_options(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelUnavailableError, match="Offline options: the embedded model"):
        load_model("gpt2-medium")


# ---------------------------------------------------------------------------------------------
# One clear line per user mistake, the cause kept


def test_unknown_model_names_the_options():
    with pytest.raises(ModelUnavailableError, match="Unknown model 'no-such-model'.*toy") as exc:
        load_model("no-such-model")
    one_line(exc)
    assert isinstance(exc.value.__cause__, ValueError)  # TransformerLens's lookup, chained


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelUnavailableError, match="close TransformerLens names: gpt2-medium"):
        load_model("gpt2-mediun")


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="No model directory") as exc:
        load_model(str(tmp_path / "absent"))
    one_line(exc)


def test_config_without_weights_is_one_clear_error(hf_gpt2, tmp_path):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf5")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="has config.json but no weights") as exc:
        load_model(str(path))
    assert "save_pretrained" in one_line(exc)


def test_directory_without_tokenizer_is_one_clear_error(hf_gpt2, tmp_path):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf5", tokenizer=False)
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelUnavailableError, match="has no tokenizer files") as exc:
            load(str(path))
        assert "gpt2_tokenizer().save_pretrained" in one_line(exc)


class NotATensor:  # a pickled object that weights_only loading must refuse
    pass


def test_pickle_with_code_is_refused(hf_gpt2, tmp_path):
    path = write_layout(hf_gpt2, tmp_path / "m", "tf4_bin")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(ModelUnavailableError, match="Cannot load the weights") as exc:
        load_model(str(path))
    msg = one_line(exc)
    assert "UnpicklingError" in msg and "NotATensor" in msg
    assert exc.value.__cause__ is not None


def test_broken_config_keeps_its_cause(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelUnavailableError, match="Cannot read .*config.json.*JSONDecodeError") as exc:
        load_model(str(tmp_path))
    assert isinstance(exc.value.__cause__, json.JSONDecodeError)


# ---------------------------------------------------------------------------------------------
# Tokenizers: a local directory first, exact names only


def test_local_directory_tokenizer_wins_over_a_gpt2_like_name(tmp_path, monkeypatch):
    """A fine-tuned ``gpt2-ft/`` (or even ``gpt2-medium/``) directory gets its own tokenizer."""
    toy_tok = load_tokenizer("toy")
    for name in ("gpt2-ft", "gpt2-medium"):
        toy_tok.save_pretrained(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2-ft", "gpt2-medium"):
        tok = load_tokenizer(name)
        assert tok.get_vocab() == toy_tok.get_vocab()
        assert tok.encode(" Paris", add_special_tokens=False) == toy_tok.encode(" Paris", add_special_tokens=False)


def test_tokenizer_of_a_typo_is_an_error():
    with pytest.raises(ModelUnavailableError, match="Unknown model 'gpt2-typo'") as exc:
        load_tokenizer("gpt2-typo")
    one_line(exc)


# ---------------------------------------------------------------------------------------------
# The embedded model


def test_toy_model_identity_and_checkpoint_files():
    from circuitlib.models import TOY_DIR

    model = load_model("toy")
    ident = model_identity(model)
    assert ident["name"] == "toy" and ident["attn_only"]
    assert (TOY_DIR / "model.safetensors").stat().st_size < 10 * 2**20
    meta = json.loads((TOY_DIR / "config.json").read_text())
    assert meta["config"]["n_layers"] == ident["n_layers"]
    assert "training" in meta


def test_processed_toy_keeps_predictions():
    raw, proc = load_model("toy"), load_model("toy", processed=True)
    tokens = torch.tensor([[raw.tokenizer.bos_token_id] + raw.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        a, b = raw(tokens)[0, -1], proc(tokens)[0, -1]
    assert torch.allclose(a - a.mean(), b - b.mean(), atol=1e-3)
