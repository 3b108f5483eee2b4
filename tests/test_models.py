"""Model loading: embedded model, local Hugging Face directory, offline tokenizer, clear errors."""

import json

import pytest
import torch

from circuitlib.models import (
    ModelUnavailableError,
    gpt2_tokenizer,
    load_model,
    load_tokenizer,
    model_identity,
)


def test_offline_gpt2_tokenizer_matches_gpt2_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Paris", add_special_tokens=False) == [6342]
    assert tok.bos_token_id == tok.eos_token_id == 50256
    assert len(tok.get_vocab()) == 50257


def test_gpt2_family_tokenizer_loads_offline():
    assert load_tokenizer("gpt2-medium").encode("Hello world") == [15496, 995]


@pytest.fixture(scope="module")
def local_hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # n_ctx as in the real GPT-2 config.json files (TransformerLens reads it)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, n_ctx=64, vocab_size=50257)
    hf = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("processed", [False, True])
def test_local_hf_directory_loads_offline_with_same_logits(local_hf_dir, processed):
    path, hf = local_hf_dir
    model = load_model(str(path), processed=processed)
    tokens = torch.tensor([gpt2_tokenizer().encode("When Mary and John went to the store, John gave")])
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    if processed:  # centring the unembedding shifts every logit of a position by the same amount
        ours, ref = ours - ours.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert model.tokenizer.encode("Hello world", add_special_tokens=False) == [15496, 995]
    assert model.cfg.model_name == str(path)


def test_unprocessed_is_default(local_hf_dir):
    path, hf = local_hf_dir
    model = load_model(str(path))
    # Unprocessed: LayerNorm weights are kept (not folded to ones), as MAPS reads them.
    assert torch.allclose(model.blocks[0].ln1.w, hf.transformer.h[0].ln_1.weight)


def test_unknown_model_names_the_options():
    with pytest.raises(ModelUnavailableError, match="Unknown model 'no-such-model'.*toy"):
        load_model("no-such-model")


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="No model directory"):
        load_model(str(tmp_path / "absent") if str(tmp_path).startswith("/") else "./absent")


def test_hub_unreachable_names_offline_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="Offline options: the embedded model"):
        load_model("gpt2-medium")


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
