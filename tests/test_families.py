"""Model families TransformerLens supports, on tiny random models built offline from HookedTransformerConfig:
a Llama-style model (grouped-query attention, rotary, RMSNorm, no biases, gated MLP), a Pythia-style model
(parallel attention and MLP, partial rotary) and a shortformer attention-only model (positions added to every
layer's queries and keys). Each with GPT-2's offline tokenizer and its 50257-token vocabulary.

References, per family: patching against TransformerLens's own ``transformer_lens.patching`` functions (and,
where it has none, hook-by-hook forwards written here); MAPS static scores against a per-head ``torch.topk``
loop the authors' way; dynamic scores against the authors' forward passes; ablation against a hook written
here; the report end to end.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from circuitlib import adapter, report, scoring
from circuitlib.interventions import Ablation, run_ablations
from circuitlib.metrics import logit_diff
from circuitlib.models import build_model, gpt2_tokenizer
from circuitlib.patching import (
    act_patch_heads,
    act_patch_layer_out,
    act_patch_resid,
    attribution_patch_heads,
    path_patch,
)
from circuitlib.tasks import capital_batch, ioi_batch, load_relation

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import patching as tl_patching

TOL = 1e-4
RELATIONS = ["name_copying", "country_to_capital_wikidata"]
TEMPLATES = ["No <X> means no", "The story of <X> contains", "This is a document about <X>",
             "When I think about <X> I think about"]
BASE = dict(n_layers=3, d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=50257, seed=0)
FAMILIES = {
    # Llama: grouped-query attention (2 key/value groups for 4 heads), rotary on the whole head, RMSNorm
    # (also before the unembedding), SiLU-gated MLP, no biases (TransformerLens keeps them as zeros).
    "llama": dict(BASE, d_mlp=128, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
                  positional_embedding_type="rotary", rotary_dim=16, n_key_value_heads=2,
                  original_architecture="LlamaForCausalLM"),
    # Pythia (GPT-NeoX): attention and MLP in parallel from the same residual, rotary on a quarter of each
    # head (rotary_pct 0.25), LayerNorm, GELU.
    "pythia": dict(BASE, d_mlp=128, act_fn="gelu", normalization_type="LN", parallel_attn_mlp=True,
                   positional_embedding_type="rotary", rotary_dim=4, original_architecture="GPTNeoXForCausalLM"),
    # TransformerLens's attn-only-Nl models: no MLPs, positions added to every layer's query/key inputs.
    "shortformer": dict(BASE, d_mlp=None, act_fn=None, attn_only=True, normalization_type="LN",
                        positional_embedding_type="shortformer"),
}


def plant_copiers(model, seed=1):
    """Tied unembedding; heads 0.0 and 1.1 copy (W_V W_O = 3x a rank-d_head projection), 0.2 anti-copies,
    so that MAPS scores are far from all-zero. Grouped-query attention: the head's group's W_V."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.unembed.W_U.copy_(model.W_E.T)
        q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_head, generator=g))
        for l, h, sign in ((0, 0, 1.0), (1, 1, 1.0), (0, 2, -1.0)):
            attn = model.blocks[l].attn
            if model.cfg.n_key_value_heads is not None:
                attn._W_V[adapter.value_group(model, h)].copy_(3 * q)
            else:
                attn.W_V[h].copy_(3 * q)
            attn.W_O[h].copy_(sign * q.T)
    return model


def make(family: str, name: str | None = None, tokenizer=None):
    tokenizer = tokenizer or gpt2_tokenizer()
    model = build_model(dict(FAMILIES[family], d_vocab=len(tokenizer.get_vocab())), tokenizer)
    model.cfg.model_name = name or f"tiny-{family}"
    model.eval()
    return plant_copiers(model)


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    return request.param, make(request.param)


@pytest.fixture(scope="module")
def ioi(fam):
    return ioi_batch(fam[1].tokenizer, 6)


def test_the_families_are_what_they_claim(fam):
    family, model = fam
    cfg = model.cfg
    assert cfg.d_vocab == 50257 and model.tokenizer.encode(" Paris") == [6342]
    block = model.blocks[0]
    if family == "llama":
        assert type(block.attn).__name__ == "GroupedQueryAttention" and block.attn._W_V.shape[0] == 2
        assert type(block.ln1).__name__ == "RMSNorm" and type(model.ln_final).__name__ == "RMSNorm"
        assert hasattr(block.mlp, "W_gate") and adapter.positions_inside_attention(model)
        assert all(float(p.detach().abs().max()) == 0.0 for n, p in model.named_parameters() if ".b" in n or "._b" in n)
    if family == "pythia":
        assert cfg.parallel_attn_mlp and cfg.rotary_dim == 4 and adapter.positions_inside_attention(model)
        assert not hasattr(block, "hook_resid_mid")
    if family == "shortformer":
        assert cfg.attn_only and adapter.shortformer(model) and not adapter.has_mlps(model)


# ---------------------------------------------------------------------------------------------
# Patching


def tl_reference(model, batch, direction, fn):
    """TransformerLens's patching (denoising by construction); noising = swap the runs, score 1 - metric."""
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt_cache = model.run_with_cache(batch.corrupt)
    clean, corrupt = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)

    def metric(logits):
        return (logit_diff(logits, batch) - corrupt) / (clean - corrupt)

    if direction == "denoising":
        return fn(model, batch.corrupt, clean_cache, metric)
    return 1 - fn(model, batch.clean, corrupt_cache, metric)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_head_patching_matches_transformer_lens(fam, ioi, direction):
    _, model = fam
    ref = tl_reference(model, ioi, direction, tl_patching.get_act_patch_attn_head_out_all_pos)
    assert ref.abs().max() > 1e-2
    assert (act_patch_heads(model, ioi, direction=direction).scores - ref).abs().max() < TOL


def test_per_position_head_patching_matches_transformer_lens(fam, ioi):
    _, model = fam
    L, S, H = model.cfg.n_layers, ioi.clean.shape[1], model.cfg.n_heads
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randint(0, n, (24,), generator=g) for n in (L, S, H)], 1)
    idx = torch.cat([idx, torch.tensor([[l, S - 1, h] for l in range(L) for h in range(H)])])  # END-ish slots
    df = pd.DataFrame(idx.numpy(), columns=["layer", "pos", "head"])
    fn = lambda m, t, c, metric: tl_patching.get_act_patch_attn_head_out_by_pos(  # noqa: E731
        m, t, c, metric, index_axis_names=None, index_df=df)
    ref = tl_reference(model, ioi, "denoising", fn)
    ours = act_patch_heads(model, ioi, direction="denoising", per_position=True, chunk=7)
    assert ref.abs().max() > 1e-2
    assert (ours[idx[:, 1], idx[:, 0], idx[:, 2]] - ref).abs().max() < TOL


def test_resid_and_layer_outputs_match_transformer_lens(fam):
    family, model = fam
    batch = capital_batch(model.tokenizer, 6)
    ref = tl_reference(model, batch, "noising", tl_patching.get_act_patch_resid_pre)
    assert ref.abs().max() > 1e-2 and (act_patch_resid(model, batch) - ref).abs().max() < TOL
    ref = tl_reference(model, batch, "denoising", tl_patching.get_act_patch_attn_out)
    assert (act_patch_layer_out(model, batch, direction="denoising") - ref).abs().max() < TOL
    if family == "shortformer":
        with pytest.raises(ValueError, match="attention-only"):
            act_patch_layer_out(model, batch, component="mlp_out")
    else:
        ref = tl_reference(model, batch, "noising", tl_patching.get_act_patch_mlp_out)
        assert (act_patch_layer_out(model, batch, component="mlp_out") - ref).abs().max() < TOL


def naive_attribution(model, batch):
    """Noising attribution written out: one clean forward keeping every z's gradient (retain_grad), the
    normalised logit difference's backward, then -grad . (z_corrupt - z_clean) per head."""
    zs = {}

    def keep(z, hook):
        z.retain_grad()
        zs[hook.layer()] = z
        return z

    with torch.no_grad():
        corrupt_logits, corrupt = model.run_with_cache(batch.corrupt)
    with torch.enable_grad():
        logits = model.run_with_hooks(batch.clean, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), keep)])
        clean_value = logit_diff(logits, batch)
        clean_value.backward()
    model.zero_grad(set_to_none=True)
    span = float(clean_value.detach()) - float(logit_diff(corrupt_logits, batch))
    out = torch.stack([-(zs[l].grad * (corrupt["z", l] - zs[l].detach())).sum((0, 1, 3))
                       for l in range(model.cfg.n_layers)])
    return out / span


def test_attribution_matches_a_written_out_gradient(fam, ioi):
    """TransformerLens has no attribution patching: the reference is the gradient formula by hand."""
    _, model = fam
    ref = naive_attribution(model, ioi)
    ours = attribution_patch_heads(model, ioi)
    assert ref.abs().max() > 1e-2 and (ours.scores - ref).abs().max() < 1e-5


def naive_path(model, batch, sender, receivers=None, which="q", at=None):
    """Hook-by-hook path patching, full forwards: every head's z frozen to clean except the sender's
    (corrupted); then (receivers given) a second clean run with the receivers' q/k/v at ``at`` (or every
    position) taken from the first. Normalised noising score."""
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt = model.run_with_cache(batch.corrupt)
        c, k = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)
        recorded = {}

        def freeze(z, hook):
            out = clean["z", hook.layer()].clone()
            if hook.layer() == sender[0]:
                out[:, :, sender[1]] = corrupt["z", hook.layer()][:, :, sender[1]]
            return out

        def record(act, hook):
            recorded[hook.name] = act.clone()

        hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(model.cfg.n_layers)]
        layers = sorted({r for r, _ in receivers or []})
        hooks += [(f"blocks.{r}.attn.hook_{which}", record) for r in layers]
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
        if receivers is not None:
            def patch(act, hook):
                rows = torch.arange(len(batch))
                for r, h in receivers:
                    if r == hook.layer():
                        if at is None:
                            act[:, :, h] = recorded[hook.name][:, :, h]
                        else:
                            pos = batch.positions[at]
                            act[rows, pos, h] = recorded[hook.name][rows, pos, h]
                return act

            logits = model.run_with_hooks(batch.clean, fwd_hooks=[(f"blocks.{r}.attn.hook_{which}", patch)
                                                                  for r in layers])
        return float(1 - (logit_diff(logits, batch) - k) / (c - k))


def mha_twin(model):
    """The same model with grouped-query attention written out as ordinary multi-head attention (each query
    head gets a copy of its group's W_K, W_V, b_K, b_V): an independent model on which per-head hooks on
    hook_k / hook_v exist."""
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k in FAMILIES["llama"]}
    cfg["n_key_value_heads"] = None
    twin = build_model(cfg, model.tokenizer)
    state = {}
    for key, value in model.state_dict().items():
        if ".attn._" in key:
            key = key.replace(".attn._", ".attn.")
            value = value.repeat_interleave(model.cfg.n_heads // model.cfg.n_key_value_heads, dim=0)
        state[key] = value
    twin.load_state_dict(state, strict=False)
    twin.eval()
    return twin


def test_path_patching_matches_hook_by_hook_reference(fam, ioi):
    family, model = fam
    senders = [(0, 0), (0, 3), (1, 1), (1, 2)]
    ours = path_patch(model, ioi, senders)
    ref = [naive_path(model, ioi, s) for s in senders]
    assert max(abs(r) for r in ref) > 1e-2
    assert max(abs(ours[s] - r) for s, r in zip(senders, ref)) < TOL
    receivers = [(2, 0), (2, 3), (1, 1)]
    # grouped-query attention: per-head keys / values exist only on the written-out twin
    ref_model = mha_twin(model) if family == "llama" else model
    if family == "llama":
        with torch.no_grad():
            assert (ref_model(ioi.clean) - model(ioi.clean)).abs().max() < 1e-4
    for which, at in [("q", "END"), ("k", None), ("v", "END")]:
        ours = path_patch(model, ioi, senders[:3], receivers=receivers, receiver_input=which, receiver_positions=at)
        for s in senders[:3]:
            assert abs(ours[s] - naive_path(ref_model, ioi, s, receivers, which, at)) < TOL, (which, s)


def test_grouped_query_receivers_patch_one_head_not_its_group():
    """Llama: path patching to head 2.3's keys changes 2.3's keys only (its group mate 2.2 keeps its own).
    Before the adapter, receivers' k / v were indexed by query head into the per-group hook_k / hook_v:
    head 3 raised IndexError, heads 0 / 1 silently patched the whole group 0."""
    model = make("llama")
    batch = ioi_batch(model.tokenizer, 6)
    twin = mha_twin(model)
    for receivers in ([(2, 3)], [(2, 1)]):
        ours = path_patch(model, batch, [(0, 0), (1, 1)], receivers=receivers, receiver_input="k")
        for s in [(0, 0), (1, 1)]:
            assert abs(ours[s] - naive_path(twin, batch, s, receivers, "k")) < TOL
    assert not model.cfg.ungroup_grouped_query_attention  # restored


# ---------------------------------------------------------------------------------------------
# MAPS


def authors_k(model_name, relation):
    """utils.get_k in amitelhelo/MAPS."""
    if "Llama-3" in model_name:
        return 3 if "copying" in relation else 25
    return 1 if "copying" in relation else 10


@torch.no_grad()
def authors_static(model, pairs, k, apply_first_mlp=True):
    """maps.calc_relation_scores: the state dict, get_w_vo (grouped-query attention: _W_V[head // group
    size]), first_mlp = blocks[0].mlp(blocks[0].ln2(x)) for layers >= 1, per head torch.topk."""
    sd, cfg = model.state_dict(), model.cfg
    emb = sd["embed.W_E"][pairs.src]
    later = model.blocks[0].mlp(model.blocks[0].ln2(emb)) if apply_first_mlp and not cfg.attn_only else emb
    out = {False: np.zeros((cfg.n_layers, cfg.n_heads)), True: np.zeros((cfg.n_layers, cfg.n_heads))}
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            if cfg.n_key_value_heads is not None:
                w_v = sd[f"blocks.{layer}.attn._W_V"][head // (cfg.n_heads // cfg.n_key_value_heads)]
            else:
                w_v = sd[f"blocks.{layer}.attn.W_V"][head]
            proj = (emb if layer == 0 else later) @ (w_v @ sd[f"blocks.{layer}.attn.W_O"][head]) @ sd["unembed.W_U"]
            for sup in (False, True):
                idx = torch.topk(-proj if sup else proj, k).indices
                out[sup][layer, head] = (idx == pairs.tgt[:, None]).sum(1).float().mean().item()
    return out


def test_static_scores_match_a_per_head_topk_loop(fam):
    _, model = fam
    fast = {sup: scoring.static_scores_many(model, RELATIONS, suppression=sup) for sup in (False, True)}
    nonzero = 0
    for name in RELATIONS:
        pairs = load_relation(name, model.tokenizer)
        ref = authors_static(model, pairs, pairs.k)
        for sup in (False, True):
            assert fast[sup][name].k == pairs.k
            assert np.array_equal(fast[sup][name].scores.numpy(), ref[sup].astype(np.float32)), (name, sup)
            nonzero += int((ref[sup] > 0).sum())
    assert nonzero >= 3  # the planted heads score


@pytest.mark.parametrize("name,first_mlp", [
    ("meta-llama/Meta-Llama-3-8B", True),
    ("meta-llama/Llama-3.1-70B", False),  # experiment1/2: apply_first_mlp is False for this one model
    ("meta-llama/Llama-2-7b-hf", True),  # not Llama-3: k = 1 / 10
])
def test_llama_name_conventions_on_the_llama_family(name, first_mlp):
    """The tiny Llama-style model under real Llama names: k by the authors' get_k, first-MLP input unless
    Llama-3.1-70B, each against the per-head loop; meta says which rules fired."""
    model = make("llama", name)
    for rel in RELATIONS:
        pairs = load_relation(rel, model.tokenizer)
        hs = scoring.static_scores(model, rel)
        k = authors_k(name, rel)
        assert hs.k == k
        ref = authors_static(model, pairs, k, apply_first_mlp=first_mlp)[False]
        assert np.array_equal(hs.scores.numpy(), ref.astype(np.float32)), rel
        assert ("no first-MLP" in hs.meta["inputs"]) == (not first_mlp)
    conv = scoring.maps_conventions(model)
    assert conv.first_mlp == first_mlp and (conv.k_copying == 3) == ("Llama-3" in name)


@torch.no_grad()
def authors_dynamic(model, pairs, template, k):
    """maps.calc_dynamic_relation_scores: the tokenizer's call on the filled prompts, the source position
    from the first prompt, a clean run caching z, a run with every head's last-row attention on the source
    (z swapped back to clean per layer); per head z[:, -1] W_O W_U and torch.topk."""
    ids = model.tokenizer([template.replace("<X>", w) for w in pairs.src_words], return_tensors="pt").input_ids
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
        res = np.zeros((L, H))
        for l in range(L):
            z = cache[f"blocks.{l}.attn.hook_z"][:, -1]
            for h in range(H):
                idx = torch.topk(z[:, h] @ model.W_O[l, h] @ model.W_U, k).indices
                res[l, h] = (idx == pairs.tgt[:, None]).sum(1).float().mean().item()
        out[context] = res
    return out


def test_dynamic_scores_match_the_authors_forward_passes(fam):
    _, model = fam
    pairs = load_relation("name_copying", model.tokenizer)
    pairs = dataclasses.replace(pairs, src=pairs.src[:16], tgt=pairs.tgt[:16], src_words=pairs.src_words[:16],
                                tgt_words=pairs.tgt_words[:16])
    refs = {t: authors_dynamic(model, pairs, t, pairs.k) for t in TEMPLATES}
    nonzero = 0
    for context in (True, False):
        fast = scoring.dynamic_scores(model, pairs, context=context)
        assert fast.meta["templates"] == TEMPLATES and fast.meta["bos"] is False  # GPT-2's tokenizer: no BOS
        for t in TEMPLATES:
            assert np.array_equal(np.array(fast.meta["per_template"][t], dtype=np.float32),
                                  refs[t][context].astype(np.float32)), (t, context)
            nonzero += int((refs[t][context] > 0).sum())
    assert nonzero >= 4


def test_maps_first_mlp_is_block_zeros_mlp_on_its_second_norm(fam):
    family, model = fam
    ids = torch.tensor([11, 464, 995])
    x = scoring.maps_inputs(model, ids)
    assert torch.equal(x[0], model.W_E[ids])
    if family == "shortformer":
        assert all(torch.equal(x[l], model.W_E[ids]) for l in range(model.cfg.n_layers))
        with pytest.raises(ValueError, match="attention-only"):
            adapter.maps_first_mlp(model, model.W_E[ids])
        return
    with torch.no_grad():
        ref = model.blocks[0].mlp(model.blocks[0].ln2(model.W_E[ids][None]))[0]
    assert torch.equal(x[1], ref) and torch.equal(x[2], ref)


# ---------------------------------------------------------------------------------------------
# Ablation


@torch.no_grad()
def naive_ablation(model, batch, heads, kind):
    """Per-prompt logit difference at END with ``heads`` ablated at every real position but BOS: zero, or
    the head's mean z over the corrupted prompts' real positions (BOS excluded), by a hook looping over
    prompts and positions; full-model logits."""
    B, S = batch.clean.shape
    pos = torch.arange(S)[None]
    mask = (pos <= batch.end[:, None]) & (pos > 0)
    _, cache = model.run_with_cache(batch.corrupt)
    hooks = []
    for l, h in heads:
        value = (torch.zeros(model.cfg.d_head) if kind == "zero"
                 else cache[f"blocks.{l}.attn.hook_z"][:, :, h][mask].mean(0))

        def hook(z, hook, h=h, value=value):
            z = z.clone()
            for b in range(B):
                for p in range(S):
                    if mask[b, p]:
                        z[b, p, h] = value
            return z

        hooks.append((f"blocks.{l}.attn.hook_z", hook))
    logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
    rows = torch.arange(B)
    last = logits[rows, batch.end]
    return last[rows, batch.answer] - last[rows, batch.wrong]


@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablation_matches_a_hook_written_here(fam, ioi, kind):
    _, model = fam
    sets = [[], [(0, 0)], [(1, 1), (2, 3)], [(0, 2), (1, 0), (2, 1)]]
    run = run_ablations(model, ioi, sets, Ablation(kind=kind))
    for i, heads in enumerate(sets):
        ref = naive_ablation(model, ioi, heads, kind)
        assert (run.logit_diff[i] - ref).abs().max() < TOL, heads
    assert (run.logit_diff[0] - run.logit_diff[3]).abs().max() > 1e-3  # ablation changes something


# ---------------------------------------------------------------------------------------------
# The report


@pytest.mark.parametrize("family", list(FAMILIES))
def test_report_runs_end_to_end(family, tmp_path, monkeypatch):
    """The whole pipeline on each family (fewer prompts than the default, to stay quick): every section,
    the markdown and the figures. The models carry the embedded model's word-level tokenizer here: with
    GPT-2's, the causal check's control prompts for word_first_letter, word_last_letter and
    entity_to_pronoun never finish (tasks.maps_prompts.relation_prompt_batch draws its derangement by
    rejection, and almost no permutation of ~240 pairs with ~70 "he" targets moves every target)."""
    from circuitlib.models import load_tokenizer

    model = make(family, tokenizer=load_tokenizer("toy"))
    monkeypatch.setattr(report, "N_PROMPTS", 16)
    monkeypatch.setattr(report, "DISCOVERY_PROMPTS", 8)
    threads = torch.get_num_threads()
    try:
        summary = report.run_report(model.cfg.model_name, tmp_path, model=model, progress=False, resume=False,
                                    n_random=20)
    finally:
        torch.set_num_threads(threads)
    assert {"baseline", "discovery", "scoring", "overlap"} <= set(summary)
    assert summary["baseline"]["model"]["attn_only"] == (family == "shortformer")
    assert all(d["circuit"]["heads"] for d in summary["discovery"].values())
    scores = summary["scoring"]
    assert scores["name_copying"]["k"] == 1 and scores["country_to_capital_wikidata"]["k"] == 10
    assert scores["name_copying"]["dynamic_with_context"]["meta"]["bos"] is True  # the word-level tokenizer's rule
    assert (tmp_path / "report.md").read_text().startswith(f"# circuitlib report: tiny-{family}")
    assert (tmp_path / "maps_static.png").exists()
