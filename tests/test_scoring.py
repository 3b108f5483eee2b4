"""MAPS scores: the fast path against naive references written the MAPS authors' way (per-head
torch.topk loops, their experiment-1 forward passes), ties, model-specific conventions, errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from circuitlib import scoring
from circuitlib.models import TOY_DIR, random_model
from circuitlib.tasks import load_relation
from circuitlib.types import HeadScores

RELATIONS = ["name_copying", "country_to_capital_wikidata"]
HAVE_TOY = (TOY_DIR / "model.safetensors").exists()
AUTHORS_TEMPLATES = [  # experiment1_correlative.TEMPLATES in amitelhelo/MAPS, typed in by hand
    "No <X> means no",
    "The story of <X> contains",
    "This is a document about <X>",
    "When I think about <X> I think about",
]
TINY = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=50257, n_ctx=64)


def subset(pairs, n):
    return dataclasses.replace(pairs, src=pairs.src[:n], tgt=pairs.tgt[:n], src_words=pairs.src_words[:n],
                               tgt_words=pairs.tgt_words[:n])


# ---------------------------------------------------------------------------------------------
# Naive references (MAPS's per-head loop)


@torch.no_grad()
def naive_static_hits(model, pairs, k, heads, suppression=False, first_mlp=True):
    """Per head: full x_s W_V W_O W_U for every source, torch.topk, target membership. Grouped-query
    attention as the authors' get_w_vo: query head h reads key/value group h // (n_heads / n_kv)."""
    emb = model.W_E[pairs.src]
    if model.cfg.attn_only or not first_mlp:
        later = emb
    else:
        later = model.blocks[0].mlp(model.blocks[0].ln2(emb[None]))[0]
    out = {}
    for l, h in heads:
        attn = model.blocks[l].attn
        if model.cfg.n_key_value_heads is not None:
            w_v = attn._W_V[h // (model.cfg.n_heads // model.cfg.n_key_value_heads)]
        else:
            w_v = attn.W_V[h]
        x = emb if l == 0 else later
        m = x @ (w_v @ attn.W_O[h]) @ model.W_U
        idx = torch.topk(-m if suppression else m, k, dim=-1).indices
        out[(l, h)] = (idx == pairs.tgt[:, None]).any(-1)
    return out


def naive_static_scores(model, pairs, k, **kw):
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    ref = naive_static_hits(model, pairs, k, heads, **kw)
    return torch.tensor([[ref[(l, h)].float().mean() for h in range(model.cfg.n_heads)]
                         for l in range(model.cfg.n_layers)])


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


@torch.no_grad()
def authors_dynamic(model, pairs, template, k, *, prepend_bos=False):
    """One template, the MAPS authors' way (maps.calc_dynamic_relation_scores): the tokenizer's own
    call on the filled prompts (GPT-2: no BOS), the source position from the first prompt, a clean run
    caching every layer's z, then one run with every head's last-row attention set onto the source
    while each layer's z is swapped back to the clean one; per head z[:, -1] W_O W_U and torch.topk.
    Returns {(context, suppression): [L, H] numpy}."""
    prompts = [template.replace("<X>", w) for w in pairs.src_words]
    ids = model.tokenizer(prompts, return_tensors="pt").input_ids
    if prepend_bos:
        ids = torch.cat([torch.full((ids.shape[0], 1), model.tokenizer.bos_token_id), ids], dim=1)
    src_pos = torch.where(ids[0] == pairs.src[0])[0].item()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    clean, fixed = {}, {}

    def keep(z, hook):
        clean[hook.name] = z.clone()

    with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", keep) for l in range(L)]):
        model(ids)

    def set_attention(pattern, hook):
        pattern[:, :, -1, :] = 0.0
        pattern[:, :, -1, src_pos] = 1.0

    def plug_clean(z, hook):
        fixed[hook.name] = z.clone()
        return clean[hook.name]

    hooks = [h for l in range(L) for h in ((f"blocks.{l}.attn.hook_pattern", set_attention),
                                           (f"blocks.{l}.attn.hook_z", plug_clean))]
    with model.hooks(fwd_hooks=hooks):
        model(ids)
    out = {}
    for context, cache in ((True, clean), (False, fixed)):
        for suppression in (False, True):
            res = np.zeros((L, H))
            for l in range(L):
                z = cache[f"blocks.{l}.attn.hook_z"][:, -1]  # [n, H, d_head]
                for h in range(H):
                    proj = z[:, h] @ model.W_O[l, h] @ model.W_U
                    idx = torch.topk(-proj if suppression else proj, k).indices
                    res[l, h] = (idx == pairs.tgt[:, None]).sum(1).float().mean().item()
            out[(context, suppression)] = res
    return out


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


def plant_copiers(model, seed=1):
    """Tied unembedding; head 0.0 and 1.1 copy (W_V W_O a projection), 0.2 anti-copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.unembed.W_U.copy_(model.W_E.T)
        q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_head, generator=g))
        for l, h, sign in ((0, 0, 1.0), (1, 1, 1.0), (0, 2, -1.0)):
            attn = model.blocks[l].attn
            if model.cfg.n_key_value_heads is not None:  # W_V is a view of the group's _W_V
                attn._W_V[h // (model.cfg.n_heads // model.cfg.n_key_value_heads)].copy_(3 * q)
            else:
                attn.W_V[h].copy_(3 * q)
            attn.W_O[h].copy_(sign * q.T)
    return model


@pytest.fixture(scope="module")
def tiny():
    """2 x 4 random model with GPT-2's tokenizer (adds no BOS), planted copy / anti-copy heads, and
    head 0.3 mapping the first 16 countries (LN'd embedding; positional embedding zeroed) to their
    capitals, so that dynamic scores of both relations are far from all-zero."""
    model = plant_copiers(random_model(TINY))
    pairs = load_relation("country_to_capital_wikidata", model.tokenizer)
    with torch.no_grad():
        model.pos_embed.W_pos.zero_()
        S = model.blocks[0].ln1(model.W_E[pairs.src[:16]][None])[0]
        model.blocks[0].attn.W_V[3].copy_(torch.linalg.pinv(S))
        model.blocks[0].attn.W_O[3].copy_(model.W_E[pairs.tgt[:16]])
    return model


# ---------------------------------------------------------------------------------------------
# Static scores: fast path == naive reference


@pytest.mark.parametrize("suppression", [False, True])
def test_static_matches_naive_on_toy(toy, suppression):
    fast = scoring.static_scores_many(toy, RELATIONS, suppression=suppression)
    for name in RELATIONS:
        pairs = load_relation(name, toy.tokenizer)
        assert fast[name].k == pairs.k
        assert torch.equal(fast[name].scores, naive_static_scores(toy, pairs, pairs.k, suppression=suppression)), name


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
    neg = copy.deepcopy(toy)
    with torch.no_grad():
        for block in neg.blocks:
            block.attn.W_O.neg_()
    for name in RELATIONS:
        sup = scoring.static_scores(toy, name, suppression=True).scores
        assert torch.equal(sup, scoring.static_scores(neg, name).scores)


# ---------------------------------------------------------------------------------------------
# Ties: a target tied with other entries across the k-th place is not a hit


def test_head_with_zero_W_O_scores_zero(toy):
    """Head 0.5 is a strong capital head; with W_O zeroed its output is exactly 0, every vocabulary
    entry ties the target, and no target is in its top-k: static, suppression and dynamic scores are
    0 (they were 1.00: "fewer than k entries strictly higher" counted every tie as a hit)."""
    dead = copy.deepcopy(toy)
    with torch.no_grad():
        dead.blocks[0].attn.W_O[5].zero_()
    for name in RELATIONS:
        for suppression in (False, True):
            assert scoring.static_scores(dead, name, suppression=suppression)[(0, 5)] == 0.0, (name, suppression)
        dyn = scoring.dynamic_scores(dead, name, context=True)
        assert dyn[(0, 5)] == 0.0, name
        # every other head is untouched
        live = scoring.static_scores(toy, name).scores
        live[0, 5] = 0.0
        assert torch.equal(scoring.static_scores(dead, name).scores, live)


@pytest.mark.parametrize("k", [1, 3, 40, 300])
def test_planted_exact_ties(k):
    """Small-integer unembedding and rows: every logit is an exact integer, so ties are exact and
    plentiful (600 entries over ~100 values; three vocabulary chunks). Reference per pair, from the
    full logits: g = others strictly above the target, e = others equal to it. g + e < k: torch.topk
    keeps the target whatever its tie order (hit; checked against torch.topk); g >= k: miss (checked
    against torch.topk); g < k <= g + e: torch.topk keeps an arbitrary part of the tie -> a miss."""
    g = torch.Generator().manual_seed(k)
    W_U_T = torch.randint(-3, 4, (600, 8), generator=g).float()
    rows = torch.randint(-3, 4, (40, 8), generator=g).float()
    rows[0] = 0.0  # a zero row: every entry ties every target
    row_of_pair = torch.arange(40).repeat_interleave(5)
    targets = torch.randint(0, 600, (200,), generator=g)
    targets[:5] = torch.tensor([0, 255, 256, 599, 300])  # chunk edges
    logits = rows[row_of_pair] @ W_U_T.T  # [200, 600], exact integers
    t = logits.gather(1, targets[:, None])
    greater = (logits > t).sum(1)
    equal = (logits == t).sum(1) - 1
    in_topk = (torch.topk(logits, k, dim=-1).indices == targets[:, None]).any(-1)
    sure_hit, sure_miss = greater + equal < k, greater >= k
    ambiguous = ~sure_hit & ~sure_miss
    assert ambiguous.sum() >= 5  # the test really exercises ties across the k-th place
    hits = scoring.topk_hits(rows, W_U_T.contiguous(), row_of_pair, targets, k)
    assert torch.equal(hits[sure_hit | sure_miss], in_topk[sure_hit | sure_miss])
    assert not hits[ambiguous].any()
    assert not hits[:5].any()  # the zero row
    for suppression in (False, True):  # the same rule on -logits
        s = -logits if suppression else logits
        ts = s.gather(1, targets[:, None])
        expected = ((s >= ts).sum(1) - 1) < k
        assert torch.equal(scoring.topk_hits(rows, W_U_T.contiguous(), row_of_pair, targets, k,
                                             suppression=suppression), expected)


# ---------------------------------------------------------------------------------------------
# Inputs and model-specific conventions


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


@pytest.mark.parametrize("name,k_copy,k_other", [
    ("meta-llama/Meta-Llama-3-8B", 3, 25),
    ("meta-llama/Llama-3.1-70B", 3, 25),
    ("gpt2-medium", 1, 10),
    ("llama-30b-hf", 1, 10),  # the original LLaMA 30B is not Llama-3
])
def test_k_by_model_name_as_the_authors_get_k(name, k_copy, k_other):
    """utils.get_k: Llama-3 models use k = 3 for copying relations and 25 otherwise; scores equal a
    per-head torch.topk loop at that k on a tiny random model carrying the name."""
    model = plant_copiers(random_model(TINY))
    model.cfg.model_name = name
    for rel, k in (("name_copying", k_copy), ("country_to_capital_wikidata", k_other)):
        pairs = load_relation(rel, model.tokenizer)
        hs = scoring.static_scores(model, rel)
        assert hs.k == k
        first_mlp = "3.1-70B" not in name
        assert torch.equal(hs.scores, naive_static_scores(model, pairs, k, first_mlp=first_mlp)), (name, rel)


def test_llama31_70b_has_no_first_mlp_input():
    """experiment1 / experiment2: apply_first_mlp is False for Llama-3.1-70B: x_s = W_E[s] at every
    layer. The planted copier in layer 1 shows that this changes its score."""
    model = plant_copiers(random_model(TINY))
    ids = torch.tensor([11, 464, 995])
    pairs = load_relation("name_copying", model.tokenizer)
    model.cfg.model_name = "meta-llama/Meta-Llama-3-8B"
    with_mlp = scoring.static_scores(model, pairs)
    model.cfg.model_name = "meta-llama/Llama-3.1-70B"
    x = scoring.maps_inputs(model, ids)
    assert all(torch.equal(x[l], model.W_E[ids]) for l in range(model.cfg.n_layers))
    without = scoring.static_scores(model, pairs)
    assert torch.equal(without.scores, naive_static_scores(model, pairs, 3, first_mlp=False))
    assert without[(1, 1)] != with_mlp[(1, 1)]
    assert "no first-MLP" in without.meta["inputs"]


def test_grouped_query_attention_static_and_dynamic():
    """A Llama-3-named tiny model with 2 key/value groups for 4 heads: static scores use the group's
    W_V (the authors' get_w_vo); dynamic scores without context (which read value vectors) equal the
    authors' construction (their hook_z holds one vector per query head)."""
    model = plant_copiers(random_model(dict(TINY, n_key_value_heads=2)))
    model.cfg.model_name = "meta-llama/Meta-Llama-3-8B"
    pairs = subset(load_relation("name_copying", model.tokenizer), 24)
    assert torch.equal(scoring.static_scores(model, pairs).scores, naive_static_scores(model, pairs, 3))
    template = AUTHORS_TEMPLATES[0]
    ref = authors_dynamic(model, pairs, template, 3)
    for context in (True, False):
        fast = scoring.dynamic_scores(model, pairs, template=template, context=context)
        assert np.array_equal(fast.scores.numpy(), ref[(context, False)].astype(np.float32)), context


@pytest.mark.parametrize("k", [0, -1, 10**9, pytest.param(2.5, marks=pytest.mark.bad_input), True])
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
    back = HeadScores.from_json(hs.to_json())
    assert torch.allclose(back.scores, hs.scores, atol=1e-6) and back.meta == hs.meta


def test_top_mapped_tokens_agree_with_scores(toy):
    pairs = load_relation("name_copying", toy.tokenizer)
    hs = scoring.static_scores(toy, pairs)
    head = hs.top(1)[0]
    hits = naive_static_hits(toy, pairs, 1, [head])[head]
    attn = toy.blocks[head[0]].attn
    for word, src, tgt, hit in list(zip(pairs.src_words, pairs.src.tolist(), pairs.tgt_words, hits.tolist()))[:10]:
        top = scoring.top_mapped_tokens(toy, head, word, n=10)
        m = (toy.W_E[src] @ attn.W_V[head[1]] @ attn.W_O[head[1]] @ toy.W_U).detach()  # toy: x_s = W_E[s]
        vals, idx = torch.sort(m, descending=True)
        assert [t for t, _ in top] == [toy.tokenizer.decode([int(i)]) for i in idx[:10]]
        assert [v for _, v in top] == [round(float(v), 4) for v in vals[:10]]
        assert (top[0][0].strip() == tgt) == hit
    with pytest.raises(ValueError, match="single token"):
        scoring.top_mapped_tokens(toy, head, "not a word at all")


# ---------------------------------------------------------------------------------------------
# Dynamic scores


def test_templates_are_the_authors():
    assert list(scoring.MAPS_TEMPLATES) == AUTHORS_TEMPLATES


@pytest.mark.parametrize("relation,n", [("name_copying", 24), ("country_to_capital_wikidata", 24)])
def test_dynamic_matches_the_authors_experiment1_on_a_gpt2_tokenizer_model(tiny, relation, n):
    """Every template, both contexts, scores and suppression scores, against the authors' forward
    passes on prompts their way (no BOS: GPT-2's tokenizer adds none); the correlation against
    numpy's on the pooled maps (static repeated once per template, as calc_correlations does)."""
    pairs = subset(load_relation(relation, tiny.tokenizer), n)
    k = pairs.k
    refs = {t: authors_dynamic(tiny, pairs, t, k) for t in AUTHORS_TEMPLATES}
    static = scoring.static_scores(tiny, pairs)
    assert torch.equal(static.scores, naive_static_scores(tiny, pairs, k))
    nonzero = 0
    for context in (True, False):
        for suppression in (False, True):
            fast = scoring.dynamic_scores(tiny, pairs, context=context, suppression=suppression)
            assert fast.meta["templates"] == AUTHORS_TEMPLATES and fast.meta["bos"] is False
            per = fast.meta["per_template"]
            for t in AUTHORS_TEMPLATES:
                assert np.array_equal(np.array(per[t], dtype=np.float32),
                                      refs[t][(context, suppression)].astype(np.float32)), (t, context, suppression)
            stacked = np.stack([refs[t][(context, suppression)] for t in AUTHORS_TEMPLATES])
            assert np.allclose(fast.scores.numpy(), stacked.mean(0), atol=1e-6)
            nonzero += int((stacked > 0).sum())
            if not suppression:
                x = np.concatenate([static.scores.numpy().astype(np.float64)] * 4).flatten()
                y = np.concatenate([refs[t][(context, False)] for t in AUTHORS_TEMPLATES]).flatten()
                r = scoring.static_dynamic_correlation(static, fast)
                if np.std(x) > 0 and np.std(y) > 0:
                    assert r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
                else:
                    assert math.isnan(r)
    assert nonzero >= 8  # the planted heads make the comparison non-trivial


def test_dynamic_bos_option_on_a_gpt2_tokenizer_model(tiny):
    """bos=True prepends <|endoftext|>; the scores equal the authors' construction on those ids."""
    pairs = subset(load_relation("name_copying", tiny.tokenizer), 16)
    t = AUTHORS_TEMPLATES[1]
    tokens, src_pos, end = scoring.dynamic_prompts(tiny, pairs, t, bos=True)
    plain = tiny.tokenizer([t.replace("<X>", w) for w in pairs.src_words], return_tensors="pt").input_ids
    assert torch.equal(tokens, torch.cat([torch.full((len(pairs), 1), 50256), plain], dim=1))
    assert torch.equal(tokens[torch.arange(len(pairs)), src_pos], pairs.src)
    ref = authors_dynamic(tiny, pairs, t, 1, prepend_bos=True)
    for context in (True, False):
        fast = scoring.dynamic_scores(tiny, pairs, template=t, context=context, bos=True)
        assert fast.meta["bos"] is True
        assert np.array_equal(fast.scores.numpy(), ref[(context, False)].astype(np.float32))


def bos_adding_gpt2_tokenizer():
    """GPT-2's BPE with a post-processor that prepends <|endoftext|> (as TransformerLens's
    add_bos_token=True tokenizer for a hub-loaded GPT-2, or a Llama tokenizer)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    from circuitlib.models import _gpt2_bpe_files, wrap_tokenizer

    files = _gpt2_bpe_files()
    backend = ByteLevelBPETokenizer.from_file(str(files[0]), str(files[1]))
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    return wrap_tokenizer(backend)


def test_default_bos_follows_the_authors_tokenizer():
    """No BOS for GPT-2-architecture models even when the attached tokenizer adds one (TransformerLens
    attaches an add_bos_token=True tokenizer; the authors use a fresh AutoTokenizer, which adds none);
    BOS when the tokenizer adds it and the architecture is not a GPT-2 / Pythia one (Llama-like)."""
    model = random_model(TINY, tokenizer=bos_adding_gpt2_tokenizer())
    pairs = subset(load_relation("name_copying", model.tokenizer), 8)
    t = AUTHORS_TEMPLATES[0]
    words = [t.replace("<X>", w) for w in pairs.src_words]
    model.cfg.original_architecture = "GPT2LMHeadModel"
    tokens, _, _ = scoring.dynamic_prompts(model, pairs, t)
    assert torch.equal(tokens, torch.tensor([model.tokenizer.encode(p, add_special_tokens=False) for p in words]))
    model.cfg.original_architecture = "GPTNeoXForCausalLM"
    assert torch.equal(scoring.dynamic_prompts(model, pairs, t)[0], tokens)
    model.cfg.original_architecture = "LlamaForCausalLM"
    tokens, src_pos, _ = scoring.dynamic_prompts(model, pairs, t)
    assert torch.equal(tokens, model.tokenizer(words, return_tensors="pt").input_ids)
    assert tokens[0, 0] == 50256 and (src_pos == 2).all()


def test_dynamic_on_the_embedded_model_keeps_bos_and_its_one_spellable_template(toy):
    """The embedded model never saw a sequence without BOS: its prompts keep it; its word-level
    vocabulary spells only one of the four templates (the others are named as dropped)."""
    pairs = subset(load_relation("name_copying", toy.tokenizer), 8)
    hs = scoring.dynamic_scores(toy, pairs)
    assert hs.meta["bos"] is True and "BOS" in hs.meta["bos_rule"]
    assert hs.meta["templates"] == ["This is a document about <X>"]
    assert sorted(hs.meta["templates_dropped"]) == sorted(set(AUTHORS_TEMPLATES) - {"This is a document about <X>"})
    tokens, src_pos, end = scoring.dynamic_prompts(toy, pairs, hs.meta["templates"][0])
    expected = [[toy.tokenizer.bos_token_id] + toy.tokenizer.encode(f"This is a document about {w}")
                for w in pairs.src_words]
    assert tokens.tolist() == expected and (src_pos == 6).all() and (end == 6).all()


@pytest.mark.parametrize("context", [True, False])
def test_dynamic_matches_naive_per_head_forward(toy, context):
    pairs = subset(load_relation("country_to_capital_wikidata", toy.tokenizer), 40)
    k = 10
    fast = scoring.dynamic_scores(toy, pairs, context=context, k=k, batch_size=16)
    ref = naive_dynamic_scores(toy, pairs, k, context)
    assert torch.equal(fast.scores, ref)


def test_dynamic_template_without_placeholder_is_an_error(toy):
    with pytest.raises(ValueError, match=r"<X>"):
        scoring.dynamic_scores(toy, "name_copying", template="no placeholder here")


def test_dynamic_source_position_is_the_placeholder_even_if_the_word_repeats(tiny):
    """"No <X> means no" with X = "no": the source token appears twice; its position is the
    placeholder's (1), as the authors' first-prompt position, not the last occurrence."""
    pairs = dataclasses.replace(subset(load_relation("name_copying", tiny.tokenizer), 1),
                                src=torch.tensor([645]), src_words=["no"])
    tokens, src_pos, end = scoring.dynamic_prompts(tiny, pairs, AUTHORS_TEMPLATES[0])
    assert tokens.tolist() == [[2949, 645, 1724, 645]] and src_pos.tolist() == [1] and end.tolist() == [3]


# ---------------------------------------------------------------------------------------------
# Correlation


def test_correlation_single_map_equals_numpy(toy):
    pairs = load_relation("country_to_capital_wikidata", toy.tokenizer)
    static = scoring.static_scores(toy, pairs)
    dyn = scoring.dynamic_scores(toy, pairs, context=False)
    expected = np.corrcoef(static.scores.numpy().astype(np.float64).ravel(),
                           np.array(dyn.meta["per_template"]["This is a document about <X>"]).ravel())[0, 1]
    assert scoring.static_dynamic_correlation(static, dyn) == pytest.approx(expected, abs=1e-12)


def test_correlation_pools_templates_as_the_authors():
    """Two per-template maps: r over the static map stacked twice against both maps (numpy), which
    is not r against their mean."""
    g = torch.Generator().manual_seed(0)
    s = HeadScores(torch.rand(3, 8, generator=g), "maps_static", "r", "m")
    m1, m2 = torch.rand(3, 8, generator=g), torch.rand(3, 8, generator=g)
    dyn = HeadScores((m1 + m2) / 2, "maps_dynamic", "r", "m",
                     meta={"per_template": {"a <X>": m1.tolist(), "b <X>": m2.tolist()}})
    x = np.concatenate([s.scores.numpy()] * 2).astype(np.float64).ravel()
    y = np.concatenate([np.array(m1.tolist()), np.array(m2.tolist())]).ravel()
    expected = np.corrcoef(x, y)[0, 1]
    assert scoring.static_dynamic_correlation(s, dyn) == pytest.approx(expected, abs=1e-12)
    assert scoring.static_dynamic_correlation(s, HeadScores.from_json(dyn.to_json())) == pytest.approx(expected, abs=1e-12)
    assert scoring.static_dynamic_correlation(s, [HeadScores(m1, "d", "r", "m"), HeadScores(m2, "d", "r", "m")]) \
        == pytest.approx(expected, abs=1e-12)
    mean_r = np.corrcoef(s.scores.numpy().ravel(), ((m1 + m2) / 2).numpy().ravel())[0, 1]
    assert abs(expected - mean_r) > 1e-3  # pooling is a different number


def test_correlation_undefined_and_shape_errors():
    a = HeadScores(torch.rand(3, 8), "maps_static", "r", "m")
    assert math.isnan(scoring.static_dynamic_correlation(a, HeadScores(torch.zeros(3, 8), "x", "r", "m")))
    with pytest.raises(ValueError, match="shape"):
        scoring.static_dynamic_correlation(a, HeadScores(torch.rand(2, 8), "x", "r", "m"))


# ---------------------------------------------------------------------------------------------
# Reference heads, toy structure, CLI


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


# ---------------------------------------------------------------------------------------------
# Speed-only choices do not change results (issue 14)


@pytest.mark.parametrize("suppression", [False, True])
def test_topk_hits_any_pair_order_and_unembedding_layout(suppression):
    """Pairs in shuffled order with repeated rows (the gather path) and unique rows (the direct path),
    ``W_U.T`` as a view and as a contiguous copy: the same hits as the rule applied to full logits
    (small integers: exact, with many ties)."""
    g = torch.Generator().manual_seed(3)
    W_U = torch.randint(-3, 4, (8, 700), generator=g).float()  # [d_model, d_vocab]
    rows = torch.randint(-3, 4, (30, 8), generator=g).float()
    for row_of_pair in (torch.randperm(30, generator=g),  # distinct rows, shuffled
                        torch.randint(0, 30, (120,), generator=g)):  # repeated rows, shuffled
        targets = torch.randint(0, 700, (row_of_pair.shape[0],), generator=g)
        s = rows[row_of_pair] @ W_U
        s = -s if suppression else s
        ts = s.gather(1, targets[:, None])
        for k in (1, 5, 60):
            expected = ((s >= ts).sum(1) - 1) < k
            for W_U_T in (W_U.T, W_U.T.contiguous()):
                hits = scoring.topk_hits(rows, W_U_T, row_of_pair, targets, k, suppression=suppression)
                assert torch.equal(hits, expected), (k, W_U_T.is_contiguous())


def test_threads_and_blocks_do_not_change_scores_and_threads_are_restored(toy):
    before = torch.get_num_threads()
    ref = {}
    for name in RELATIONS:
        pairs = load_relation(name, toy.tokenizer)
        ref[name] = naive_static_scores(toy, pairs, pairs.k)
    for threads in (1, 2, None):
        for max_rows in (1, 65536):
            out = scoring.static_scores_many(toy, RELATIONS, threads=threads, max_rows=max_rows)
            assert torch.get_num_threads() == before
            for name in RELATIONS:
                assert torch.equal(out[name].scores, ref[name]), (threads, max_rows, name)
    with pytest.raises(ValueError, match="k must be an integer"):
        scoring.static_scores_many(toy, RELATIONS, k=0, threads=1 if before != 1 else 2)
    assert torch.get_num_threads() == before

