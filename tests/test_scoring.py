"""MAPS scores: the fast path against a naive per-head reference, invariances, errors, toy structure."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from circuitlib import scoring
from circuitlib.metrics import accuracy, logit_diff
from circuitlib.models import TOY_DIR, random_model
from circuitlib.tasks import capital_batch, load_relation
from circuitlib.types import HeadScores

RELATIONS = ["name_copying", "country_to_capital_wikidata"]
HAVE_TOY = (TOY_DIR / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Naive references (MAPS's per-head loop)


@torch.no_grad()
def naive_static_hits(model, pairs, k, heads, suppression=False):
    """Per head: full x_s W_V W_O W_U for every source, torch.topk, target membership."""
    emb = model.W_E[pairs.src]
    if model.cfg.attn_only:
        later = emb
    else:
        later = model.blocks[0].mlp(model.blocks[0].ln2(emb[None]))[0]
    out = {}
    for l, h in heads:
        x = emb if l == 0 else later
        m = x @ (model.W_V[l, h] @ model.W_O[l, h]) @ model.W_U
        idx = torch.topk(-m if suppression else m, k, dim=-1).indices
        out[(l, h)] = (idx == pairs.tgt[:, None]).any(-1)
    return out


@torch.no_grad()
def naive_dynamic_scores(model, pairs, k, context):
    """Per head, one forward pass each; without context the head's END attention is forced onto the
    source token with a hook_pattern hook (MAPS's construction), its z read at END."""
    tokens, src_pos, end = scoring.dynamic_prompts(model, pairs)
    rows = torch.arange(tokens.shape[0])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.zeros(L, H)
    for l in range(L):
        for h in range(H):
            store = {}

            def force(pattern, hook, h=h):
                pattern[rows, h, end] = 0.0
                pattern[rows, h, end, src_pos] = 1.0
                return pattern

            def grab(z, hook, h=h):
                store["z"] = z[rows, end, h].clone()

            hooks = [(f"blocks.{l}.attn.hook_z", grab)]
            if not context:
                hooks.insert(0, (f"blocks.{l}.attn.hook_pattern", force))
            with model.hooks(fwd_hooks=hooks):
                model(tokens)
            m = store["z"] @ model.W_O[l, h] @ model.W_U
            idx = torch.topk(m, k, dim=-1).indices
            scores[l, h] = (idx == pairs.tgt[:, None]).any(-1).float().mean()
    return scores


# ---------------------------------------------------------------------------------------------
# Fixtures






@pytest.fixture(scope="module")
def medium():
    """Random gpt2-medium-shaped model (real GPT-2 tokenizer) with tied unembedding and two planted
    heads: 0.0 copies (W_V W_O = a rank-64 projection) and 0.1 anti-copies (its negation)."""
    model = random_model()
    with torch.no_grad():
        model.unembed.W_U.copy_(model.W_E.T)
        q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_head))
        model.blocks[0].attn.W_V[0].copy_(q)
        model.blocks[0].attn.W_O[0].copy_(q.T)
        model.blocks[0].attn.W_V[1].copy_(q)
        model.blocks[0].attn.W_O[1].copy_(-q.T)
    return model


# ---------------------------------------------------------------------------------------------
# Static scores: fast path == naive reference


@pytest.mark.parametrize("suppression", [False, True])
def test_static_matches_naive_on_toy(toy, suppression):
    heads = [(l, h) for l in range(toy.cfg.n_layers) for h in range(toy.cfg.n_heads)]
    fast = scoring.static_scores_many(toy, RELATIONS, suppression=suppression)
    for name in RELATIONS:
        pairs = load_relation(name, toy.tokenizer)
        ref = naive_static_hits(toy, pairs, pairs.k, heads, suppression)
        expected = torch.tensor([[ref[(l, h)].float().mean() for h in range(toy.cfg.n_heads)]
                                 for l in range(toy.cfg.n_layers)])
        assert fast[name].k == pairs.k
        assert torch.equal(fast[name].scores, expected), name


@pytest.mark.parametrize("k", [1, 7, 40])
def test_topk_membership_per_pair_matches_torch_topk(toy, k):
    """Per (head, pair) membership, not only the averaged scores, for several k."""
    pairs = load_relation("country_to_capital_wikidata", toy.tokenizer)
    layer = toy.cfg.n_layers - 1
    x = scoring.maps_inputs(toy, pairs.src)[layer]
    for h in range(toy.cfg.n_heads):
        rows = x @ toy.W_V[layer, h] @ toy.W_O[layer, h]
        hits = scoring.topk_hits(rows, toy.W_U.T.contiguous(), torch.arange(len(pairs)), pairs.tgt, k)
        ref = naive_static_hits(toy, pairs, k, [(layer, h)])[(layer, h)]
        assert torch.equal(hits, ref)


def test_static_matches_naive_on_gpt2_medium_shape(medium):
    fast = scoring.static_scores_many(medium, RELATIONS)
    heads = [(0, 0), (0, 1), (1, 0), (23, 15)]
    for name in RELATIONS:
        pairs = load_relation(name, medium.tokenizer)
        ref = naive_static_hits(medium, pairs, pairs.k, heads)
        for head in heads:
            assert fast[name][head] == pytest.approx(ref[head].float().mean().item(), abs=0), (name, head)
    # the planted copying head is found; the anti-copying one is not a copier
    assert fast["name_copying"][(0, 0)] >= 0.9
    assert fast["name_copying"][(0, 1)] == 0.0


def test_suppression_finds_planted_anti_copier(medium):
    pairs = load_relation("name_copying", medium.tokenizer)
    attn = medium.blocks[0].attn
    rows = scoring.maps_inputs(medium, pairs.src)[0] @ attn.W_V[1] @ attn.W_O[1]
    W_U_T = medium.W_U.T.contiguous()
    for suppression in (False, True):
        hits = scoring.topk_hits(rows, W_U_T, torch.arange(len(pairs)), pairs.tgt, 1, suppression=suppression)
        ref = naive_static_hits(medium, pairs, 1, [(0, 1)], suppression=suppression)[(0, 1)]
        assert torch.equal(hits, ref)
    assert hits.float().mean() >= 0.9  # suppression view of the anti-copier


def test_suppression_equals_static_with_negated_W_O(toy):
    import copy

    neg = copy.deepcopy(toy)
    with torch.no_grad():
        for block in neg.blocks:
            block.attn.W_O.neg_()
    for name in RELATIONS:
        sup = scoring.static_scores(toy, name, suppression=True).scores
        assert torch.equal(sup, scoring.static_scores(neg, name).scores)


def test_maps_inputs_conventions():
    model = random_model(dict(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=50257, n_ctx=64))
    ids = torch.tensor([11, 464, 995])
    x = scoring.maps_inputs(model, ids)
    assert x.shape == (3, 3, 64)
    assert torch.equal(x[0], model.W_E[ids])  # layer 0: raw embedding
    mlp = model.blocks[0].mlp(model.blocks[0].ln2(model.W_E[ids][None]))[0]
    assert torch.allclose(x[1], mlp) and torch.equal(x[1], x[2])  # MLP output only, no embedding added
    assert not torch.allclose(x[1], model.W_E[ids] + mlp)


def test_attention_only_inputs_are_raw_embeddings(toy):
    ids = torch.tensor([3, 5, 8])
    x = scoring.maps_inputs(toy, ids)
    assert all(torch.equal(x[l], toy.W_E[ids]) for l in range(toy.cfg.n_layers))


@pytest.mark.parametrize("k", [0, -1, 10**9, 2.5, True])
def test_k_out_of_range_is_a_clear_error(toy, k):
    with pytest.raises(ValueError, match="k must be an integer"):
        scoring.static_scores(toy, "name_copying", k=k)
    with pytest.raises(ValueError, match="k must be an integer"):
        scoring.dynamic_scores(toy, "name_copying", k=k)


def test_k_equal_to_vocab_scores_one_everywhere(toy):
    hs = scoring.static_scores(toy, "country_to_capital_wikidata", k=toy.cfg.d_vocab)
    assert torch.equal(hs.scores, torch.ones_like(hs.scores))


def test_scores_are_headscores_with_provenance(toy):
    hs = scoring.static_scores(toy, "country_to_capital_wikidata")
    assert isinstance(hs, HeadScores) and hs.k == 10 and hs.method == "maps_static"
    assert hs.meta["pairs_used"] == len(load_relation("country_to_capital_wikidata", toy.tokenizer))
    assert HeadScores.from_json(hs.to_json()).scores.shape == hs.scores.shape


def test_top_mapped_tokens_agree_with_scores(toy):
    pairs = load_relation("name_copying", toy.tokenizer)
    hs = scoring.static_scores(toy, pairs)
    head = hs.top(1)[0]
    hits = naive_static_hits(toy, pairs, 1, [head])[head]
    for word, tgt, hit in list(zip(pairs.src_words, pairs.tgt_words, hits.tolist()))[:10]:
        top = scoring.top_mapped_tokens(toy, head, word, n=10)
        assert len(top) == 10 and top[0][1] >= top[-1][1]
        assert (top[0][0].strip() == tgt) == hit
    with pytest.raises(ValueError, match="single token"):
        scoring.top_mapped_tokens(toy, head, "not a word at all")


# ---------------------------------------------------------------------------------------------
# Dynamic scores


@pytest.mark.parametrize("context", [True, False])
def test_dynamic_matches_naive_per_head_forward(toy, context):
    full = load_relation("country_to_capital_wikidata", toy.tokenizer)
    pairs = dataclasses.replace(full, src=full.src[:40], tgt=full.tgt[:40], src_words=full.src_words[:40],
                                tgt_words=full.tgt_words[:40])
    k = 10
    fast = scoring.dynamic_scores(toy, pairs, context=context, k=k, batch_size=16)
    ref = naive_dynamic_scores(toy, pairs, k, context)
    assert torch.equal(fast.scores, ref)


def test_dynamic_template_without_placeholder_is_an_error(toy):
    with pytest.raises(ValueError, match=r"\[X\]"):
        scoring.dynamic_scores(toy, "name_copying", template="no placeholder here")


def test_correlation_properties():
    a = HeadScores(torch.rand(3, 8), "maps_static", "r", "m")
    b = HeadScores(2 * a.scores + 1, "maps_dynamic", "r", "m")
    assert scoring.static_dynamic_correlation(a, b) == pytest.approx(1.0)
    assert scoring.static_dynamic_correlation(a, HeadScores(-a.scores, "x", "r", "m")) == pytest.approx(-1.0)
    assert math.isnan(scoring.static_dynamic_correlation(a, HeadScores(torch.zeros(3, 8), "x", "r", "m")))
    with pytest.raises(ValueError, match="shape"):
        scoring.static_dynamic_correlation(a, HeadScores(torch.rand(2, 8), "x", "r", "m"))


# ---------------------------------------------------------------------------------------------
# Ablation curves and the causal check


def test_reference_heads():
    assert scoring.reference_heads("gpt2-medium") == [(15, 14), (16, 15), (17, 4), (18, 5), (19, 15)]
    assert scoring.reference_heads("toy") == []
    assert scoring.reference_heads("no-such-model") == []


needs_toy = pytest.mark.skipif(not HAVE_TOY, reason="embedded model checkpoint not present")


@needs_toy
def test_toy_has_a_country_to_capital_head(toy):
    hs = scoring.static_scores(toy, "country_to_capital_wikidata")
    assert hs.scores.max() >= 0.5


@needs_toy
def test_cli_scores_json(capsys):
    from circuitlib.__main__ import main

    assert main(["scores", "--model", "toy", "--relation", "name_copying", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 1 and out["pairs_used"] > 30
    assert len(out["scores"]) == 3 and len(out["scores"][0]) == 8
    assert main(["scores", "--model", "toy", "--relation", "name_copying", "--k", "0"]) == 2
