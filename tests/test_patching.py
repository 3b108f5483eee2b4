"""Activation / attribution / path patching against TransformerLens and naive references."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from circuitlib.metrics import logit_diff, normalise
from circuitlib.models import build_model
from circuitlib.patching import (
    act_patch_heads,
    act_patch_layer_out,
    act_patch_resid,
    attribution_patch_heads,
    path_patch,
)
from circuitlib.tasks import capital_batch, ioi_batch, report_tasks, task_batch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens import patching as tl_patching

TOL = 1e-4


@pytest.fixture(scope="module")
def shortformer():
    """A tiny random attention-only model with shortformer positions (TransformerLens's attn-only-Nl
    models): the positional embedding is added to every layer's query/key inputs, never to the
    residual stream."""
    from circuitlib.toy.corpus import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = dict(n_layers=3, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_mlp=None, act_fn=None, attn_only=True,
               normalization_type="LN", positional_embedding_type="shortformer", d_vocab=len(tok.get_vocab()))
    return build_model(cfg, tok)


@pytest.fixture(scope="module")
def mlp_model(toy):
    """A small random GPT-2-style model *with* MLPs, on the toy's word-level tokenizer."""
    torch.manual_seed(0)
    cfg = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, act_fn="gelu_new", n_ctx=32,
               normalization_type="LN", positional_embedding_type="standard", d_vocab=toy.cfg.d_vocab)
    return build_model(cfg, toy.tokenizer)


@pytest.fixture(scope="module")
def ioi(toy):
    return ioi_batch(toy.tokenizer, 8)


@pytest.fixture(scope="module")
def capitals(toy):
    return capital_batch(toy.tokenizer, 8)


def tl_reference(model, batch, direction, fn):
    """TransformerLens's patching (denoising by construction); noising = swap runs, score 1 - metric."""
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt_cache = model.run_with_cache(batch.corrupt)
    clean, corrupt = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)

    def metric(logits):
        return (logit_diff(logits, batch) - corrupt) / (clean - corrupt)

    if direction == "denoising":
        return fn(model, batch.corrupt, clean_cache, metric)
    return 1 - fn(model, batch.clean, corrupt_cache, metric)


def naive_layer_out(model, batch, direction, component, metric):
    """One full forward per layer with ``run_with_hooks``: the whole ``hook_<component>`` output of the
    layer replaced by the source run's. Returns the effect (noising: m(clean) - m(patched); denoising:
    m(patched) - m(corrupt)) of the raw metric ``metric(logits)``."""
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt_cache = model.run_with_cache(batch.corrupt)
        base, src = (batch.clean, corrupt_cache) if direction == "noising" else (batch.corrupt, clean_cache)
        out = torch.zeros(model.cfg.n_layers)
        for l in range(model.cfg.n_layers):
            name = f"blocks.{l}.hook_{component}"
            patched = metric(model.run_with_hooks(base, fwd_hooks=[(name, lambda act, hook: src[hook.name])]))
            out[l] = metric(clean_logits) - patched if direction == "noising" else patched - metric(corrupt_logits)
    return out


def naive_path_to_logits(model, batch, sender):
    """One full clean forward with every head's z frozen to its clean value except ``sender``'s, taken
    from the corrupted run; the normalised noising score 1 - patched."""
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt = model.run_with_cache(batch.corrupt)
        c, k = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)

        def freeze(z, hook):
            layer = int(hook.name.split(".")[1])
            out = clean["z", layer].clone()
            if layer == sender[0]:
                out[:, :, sender[1]] = corrupt["z", layer][:, :, sender[1]]
            return out

        hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(model.cfg.n_layers)]
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
        return float(1 - (logit_diff(logits, batch) - k) / (c - k))


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_heads_match_transformer_lens(toy, ioi, capitals, direction, task):
    batch = ioi if task == "ioi" else capitals
    ref = tl_reference(toy, batch, direction, tl_patching.get_act_patch_attn_head_out_all_pos)
    ours = act_patch_heads(toy, batch, direction=direction)
    assert ref.abs().max() > 1e-3  # the comparison is not between two zero grids
    assert (ours.scores - ref).abs().max() < TOL
    assert ours.meta["direction"] == direction and ours.meta["metric"] == "normalised_logit_diff"


def test_heads_per_position_and_chunking_match_transformer_lens(toy, ioi):
    """TransformerLens on chosen (layer, pos, head) patches (its loop over all of them is slow): every
    position of the two heads that matter most (by TransformerLens's all-position patching), and
    random patches, positions before the first corrupted token (never recomputed by us) among them."""
    import pandas as pd

    L, S, H = toy.cfg.n_layers, ioi.clean.shape[1], toy.cfg.n_heads
    all_pos = tl_reference(toy, ioi, "denoising", tl_patching.get_act_patch_attn_head_out_all_pos)
    first = int((ioi.clean != ioi.corrupt).any(0).float().argmax())
    top = all_pos.flatten().abs().argsort(descending=True)[:2].tolist()
    strong = [(i // H, p, i % H) for i in top for p in range(first, S)]
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([torch.randint(0, n, (16,), generator=g) for n in (L, S, H)], 1)
    early = torch.stack([torch.randint(0, n, (8,), generator=g) for n in (L, first, H)], 1)
    idx = torch.cat([torch.tensor(strong), rand, early])
    df = pd.DataFrame(idx.numpy(), columns=["layer", "pos", "head"])
    fn = lambda m, t, c, metric: tl_patching.get_act_patch_attn_head_out_by_pos(  # noqa: E731
        m, t, c, metric, index_axis_names=None, index_df=df)
    ref = tl_reference(toy, ioi, "denoising", fn)
    ours = act_patch_heads(toy, ioi, direction="denoising", per_position=True, chunk=5)
    assert ours.shape == (S, L, H)
    assert ref.abs().max() > 0.1
    assert (ours[idx[:, 1], idx[:, 0], idx[:, 2]] - ref).abs().max() < TOL
    one = act_patch_heads(toy, ioi, direction="denoising", chunk=1)  # one patched copy per forward
    assert (one.scores - all_pos).abs().max() < TOL


def test_resid_and_attn_out_match_transformer_lens(toy, capitals):
    ref = tl_reference(toy, capitals, "noising", tl_patching.get_act_patch_resid_pre)
    assert (act_patch_resid(toy, capitals) - ref).abs().max() < TOL
    ref = tl_reference(toy, capitals, "denoising", tl_patching.get_act_patch_attn_out)
    assert (act_patch_layer_out(toy, capitals, direction="denoising") - ref).abs().max() < TOL


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_whole_layer_out_matches_naive_per_layer_hooks(toy, capitals, direction):
    """per_position=False: each layer's attention output patched at every position, against one
    run_with_hooks forward per layer (normalised logit difference computed here)."""
    with torch.no_grad():
        clean, corrupt = logit_diff(toy(capitals.clean), capitals), logit_diff(toy(capitals.corrupt), capitals)
    metric = lambda logits: (logit_diff(logits, capitals) - corrupt) / (clean - corrupt)  # noqa: E731
    ref = naive_layer_out(toy, capitals, direction, "attn_out", metric)
    assert ref.abs().max() > 1e-2
    ours = act_patch_layer_out(toy, capitals, per_position=False, direction=direction)
    assert (ours - ref).abs().max() < TOL


def test_small_model_with_mlps_matches_transformer_lens(mlp_model):
    """Scores are normalised by clean - corrupt, which on a random model is close to 0 (-0.004 here), so
    the normalised grids are large (up to ~15) and a float32 rounding error in a logit difference is
    divided by it too. The tolerance is therefore set on the raw logit-difference scale, where float32
    works: a dot product of d_model terms may err by about d_model * eps * |logit| (64 * 1.2e-7 * 3.1 =
    2.4e-5 here; the largest measured raw difference is 4e-7, 1-2 ulp), divided by |clean - corrupt|
    to compare normalised scores. Each grid must exceed it 100-fold, so the check is not vacuous."""
    batch = ioi_batch(mlp_model.tokenizer, 6)
    with torch.no_grad():
        clean_logits, corrupt_logits = mlp_model(batch.clean), mlp_model(batch.corrupt)
    denom = float((logit_diff(clean_logits, batch) - logit_diff(corrupt_logits, batch)).abs())
    rows = torch.arange(len(batch))
    scale = float(torch.cat([clean_logits[rows, batch.end], corrupt_logits[rows, batch.end]]).abs().max())
    tol = mlp_model.cfg.d_model * torch.finfo(torch.float32).eps * scale / denom

    def check(ours, ref):
        assert ref.abs().max() > 100 * tol  # the grid is far above rounding: a wrong patch would show
        assert (ours - ref).abs().max() < tol

    for direction in ("noising", "denoising"):
        ref = tl_reference(mlp_model, batch, direction, tl_patching.get_act_patch_attn_head_out_all_pos)
        check(act_patch_heads(mlp_model, batch, direction=direction).scores, ref)
    ref = tl_reference(mlp_model, batch, "noising", tl_patching.get_act_patch_mlp_out)
    check(act_patch_layer_out(mlp_model, batch, component="mlp_out"), ref)
    raw = lambda logits: logit_diff(logits, batch)  # noqa: E731
    ref = naive_layer_out(mlp_model, batch, "noising", "mlp_out", raw)
    ours = act_patch_layer_out(mlp_model, batch, component="mlp_out", per_position=False,
                               metric=lambda end_logits, b: logit_diff(end_logits, b))
    assert ref.abs().max() > 1e-4 and (ours - ref).abs().max() < 1e-5
    ref = tl_reference(mlp_model, batch, "denoising", tl_patching.get_act_patch_resid_pre)
    check(act_patch_resid(mlp_model, batch, direction="denoising"), ref)


def test_mlp_out_on_attention_only_model_is_one_clear_error(toy, ioi):
    with pytest.raises(ValueError, match="attention-only"):
        act_patch_layer_out(toy, ioi, component="mlp_out")


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_accuracy_and_callable_metrics_match_transformer_lens(toy, capitals, direction):
    """metric='accuracy' and a callable (raw logit difference) against TransformerLens's head patching
    with the same metric written here; effects are unnormalised: m(patched) - m(corrupt) when
    denoising, m(clean) - m(patched) when noising.

    The batch: the 8 capitals prompts, else 8 prompts of the next report task, the first on which
    TransformerLens's accuracy grid moves (some single head flips a prompt in this direction), so the
    accuracy comparison is never between two zero grids. A distributed circuit may have no head that
    flips a prompt alone: denoising on the capitals prompts does not on the R17s2 model."""
    fn = tl_patching.get_act_patch_attn_head_out_all_pos

    def metrics(batch):
        def acc(logits):
            last = logits[torch.arange(len(batch)), batch.end]
            return (last.gather(1, batch.answer[:, None]) > last.gather(1, batch.wrong[:, None])).float().mean()

        def diff(logits):
            last = logits[torch.arange(len(batch)), batch.end]
            return (last.gather(1, batch.answer[:, None]) - last.gather(1, batch.wrong[:, None])).mean()

        return acc, diff

    def tl_effect(batch, metric):
        with torch.no_grad():
            clean_logits, clean_cache = toy.run_with_cache(batch.clean)
            corrupt_logits, corrupt_cache = toy.run_with_cache(batch.corrupt)
        if direction == "denoising":
            return fn(toy, batch.corrupt, clean_cache, metric) - metric(corrupt_logits)
        return metric(clean_logits) - fn(toy, batch.clean, corrupt_cache, metric)

    candidates = [capitals] + [task_batch(t, toy.tokenizer, 8) for t in report_tasks() if t != "capitals"]
    for batch in candidates:
        acc, diff = metrics(batch)
        ref_acc = tl_effect(batch, acc)
        if ref_acc.abs().max() > 0.1:  # some head moves the metric: not two zero grids
            break
    assert ref_acc.abs().max() > 0.1, "precondition: some head flips a prompt's accuracy on some task"
    ref_diff = tl_effect(batch, diff)
    assert ref_diff.abs().max() > 0.1
    for ours_metric, ref in [("accuracy", ref_acc), (lambda logits, b: logit_diff(logits, b), ref_diff)]:
        ours = act_patch_heads(toy, batch, metric=ours_metric, direction=direction)
        assert (ours.scores - ref).abs().max() < 1e-4
    assert act_patch_heads(toy, batch, metric="accuracy").meta["metric"] == "accuracy"


def test_normalise_is_a_hand_computation_and_refuses_equal_baselines():
    assert normalise(3.0, 5.0, 1.0) == 0.5 and normalise(1.0, 5.0, 1.0) == 0.0
    assert torch.allclose(normalise(torch.tensor([1.0, 2.0]), torch.tensor(3.0), torch.tensor(-1.0)),
                          torch.tensor([0.5, 0.75]))
    with pytest.raises(ValueError, match="clean and corrupt metrics are equal"):
        normalise(1.0, 2.0, 2.0)  # was ZeroDivisionError
    with pytest.raises(ValueError, match="clean and corrupt metrics are equal"):
        normalise(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(2.0))  # was inf


def test_equal_clean_and_corrupt_metric_is_one_clear_error(toy, ioi):
    """answer == wrong: the logit difference is exactly 0 on both runs though the prompts differ."""
    same = dataclasses.replace(ioi, wrong=ioi.answer.clone())
    for call in (attribution_patch_heads, act_patch_heads, path_patch):  # attribution: ZeroDivisionError before
        with pytest.raises(ValueError, match="clean and corrupt metrics are equal") as info:
            call(toy, same)
        assert "corruption" in str(info.value)  # says what to do


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_shortformer_heads_and_resid_match_transformer_lens(shortformer, direction):
    """Shortformer models add positions inside every layer: patching's forward from a later layer
    must still get them (without: off by up to 1.0). TransformerLens's patching runs full forwards."""
    batch = ioi_batch(shortformer.tokenizer, 8)
    ref = tl_reference(shortformer, batch, direction, tl_patching.get_act_patch_attn_head_out_all_pos)
    assert ref.abs().max() > 1e-2
    assert (act_patch_heads(shortformer, batch, direction=direction).scores - ref).abs().max() < TOL
    ref = tl_reference(shortformer, batch, direction, tl_patching.get_act_patch_resid_pre)
    assert (act_patch_resid(shortformer, batch, direction=direction) - ref).abs().max() < TOL


def test_shortformer_path_patching_matches_hook_by_hook_reference(shortformer):
    batch = ioi_batch(shortformer.tokenizer, 8)
    senders = [(0, 0), (0, 3), (1, 1), (1, 2)]
    ours = path_patch(shortformer, batch, senders)
    ref = torch.tensor([naive_path_to_logits(shortformer, batch, s) for s in senders])
    assert ref.abs().max() > 1e-2
    assert (torch.tensor([ours[s] for s in senders]) - ref).abs().max() < TOL
    receivers = [(2, 0), (2, 3), (1, 1)]
    for which, at in [("q", "END"), ("k", None)]:
        ours = path_patch(shortformer, batch, senders, receivers=receivers, receiver_input=which,
                          receiver_positions=at)
        for s in senders[:3]:
            assert abs(ours[s] - naive_path_to_receivers(shortformer, batch, s, receivers, which, at)) < TOL


def test_attribution_is_exact_where_the_metric_is_linear():
    """No final LayerNorm, attention-only: END logits are linear in the last layer's z, so attribution
    patching of last-layer heads equals activation patching; earlier layers only approximate it."""
    from circuitlib.toy.corpus import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(1)
    cfg = dict(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=None, act_fn=None, attn_only=True,
               normalization_type=None, positional_embedding_type="standard", d_vocab=len(tok.get_vocab()))
    model = build_model(cfg, tok)
    batch = ioi_batch(tok, 8)
    for direction in ("noising", "denoising"):
        exact = act_patch_heads(model, batch, direction=direction)
        approx = attribution_patch_heads(model, batch, direction=direction)
        assert (exact.scores[-1] - approx.scores[-1]).abs().max() < 1e-4
        per_pos = attribution_patch_heads(model, batch, direction=direction, per_position=True)
        assert (per_pos.sum(0) - approx.scores).abs().max() < 1e-5
    # the passes meta reports are the passes that run (counted with plain PyTorch module hooks)
    counts = {"forward": 0, "backward": 0}
    fwd = model.embed.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    bwd = model.unembed.register_full_backward_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1))
    try:
        passes = attribution_patch_heads(model, batch).meta["passes"]
    finally:
        fwd.remove()
        bwd.remove()
    assert counts == {"forward": 2, "backward": 1}
    assert passes["forward"] == counts["forward"] and passes["backward"] == counts["backward"]


def test_attribution_tracks_exact_patching_on_toy(toy, ioi):
    exact = act_patch_heads(toy, ioi).scores.flatten()
    approx = attribution_patch_heads(toy, ioi).scores.flatten()
    assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.5
    with pytest.raises(ValueError, match="differentiable"):
        attribution_patch_heads(toy, ioi, metric="accuracy")


def test_path_to_logits_of_last_layer_equals_activation_patching(toy, ioi):
    last = toy.cfg.n_layers - 1
    paths = path_patch(toy, ioi)
    act = act_patch_heads(toy, ioi)
    assert (paths.scores[last] - act.scores[last]).abs().max() < 1e-5


def test_path_to_logits_equals_direct_effect_on_attention_only_model(toy, ioi):
    """Attention-only, all other heads frozen: the sender's change reaches the logits only directly."""
    with torch.no_grad():
        clean_logits, clean_cache = toy.run_with_cache(ioi.clean)
        corrupt_logits, corrupt_cache = toy.run_with_cache(ioi.corrupt)
        clean, corrupt = logit_diff(clean_logits, ioi), logit_diff(corrupt_logits, ioi)
        rows = torch.arange(len(ioi))
        final = clean_cache[f"blocks.{toy.cfg.n_layers - 1}.hook_resid_post"][rows, ioi.end]
        ref = torch.zeros(toy.cfg.n_layers, toy.cfg.n_heads)
        for l in range(toy.cfg.n_layers):
            delta = corrupt_cache["z", l][rows, ioi.end] - clean_cache["z", l][rows, ioi.end]
            for h in range(toy.cfg.n_heads):
                resid = final + delta[:, h] @ toy.W_O[l, h]
                patched = logit_diff(toy.unembed(toy.ln_final(resid[:, None]))[:, 0], ioi)
                ref[l, h] = 1 - (patched - corrupt) / (clean - corrupt)
    assert ref.abs().max() > 1e-3
    assert (path_patch(toy, ioi).scores - ref).abs().max() < 1e-4


def naive_path_to_receivers(model, batch, sender, receivers, which, at):
    """Two forward passes per sender with run_with_hooks, no batching, no caching tricks."""
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(batch.clean)
        corrupt_logits, corrupt = model.run_with_cache(batch.corrupt)
        c, k = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)
        recorded = {}

        def freeze(z, hook):
            layer = int(hook.name.split(".")[1])
            out = clean["z", layer].clone()
            if layer == sender[0]:
                out[:, :, sender[1]] = corrupt["z", layer][:, :, sender[1]]
            return out

        def record(act, hook):
            recorded[hook.name] = act.clone()

        hooks = [(f"blocks.{l}.attn.hook_z", freeze) for l in range(model.cfg.n_layers)]
        hooks += [(f"blocks.{r}.attn.hook_{which}", record) for r in {r for r, _ in receivers}]
        model.run_with_hooks(batch.clean, fwd_hooks=hooks)

        def patch(act, hook):
            layer = int(hook.name.split(".")[1])
            rows = torch.arange(len(batch))
            for r, h in receivers:
                if r == layer:
                    if at is None:
                        act[:, :, h] = recorded[hook.name][:, :, h]
                    else:
                        pos = batch.positions[at]
                        act[rows, pos, h] = recorded[hook.name][rows, pos, h]
            return act

        logits = model.run_with_hooks(
            batch.clean, fwd_hooks=[(f"blocks.{r}.attn.hook_{which}", patch) for r in {r for r, _ in receivers}]
        )
        return float(1 - (logit_diff(logits, batch) - k) / (c - k))


@pytest.mark.parametrize("which,at", [("q", "END"), ("k", None), ("v", None)])
def test_path_to_receivers_matches_naive_two_pass_reference(toy, ioi, which, at):
    L = toy.cfg.n_layers
    receivers = [(L - 1, 0), (L - 1, 3), (L - 2, 1)]
    senders = [(0, 0), (0, 5), (L - 2, 2), (L - 1, 1)]
    ours = path_patch(toy, ioi, senders, receivers=receivers, receiver_input=which, receiver_positions=at)
    for s in senders:
        assert abs(ours[s] - naive_path_to_receivers(toy, ioi, s, receivers, which, at)) < 1e-4
    assert ours[(L - 1, 1)] == 0.0  # no receiver downstream of a last-layer sender
    assert ours[(1, 7)] == 0.0 and "1.7" not in ours.meta["senders"]


@pytest.mark.parametrize("method", ["act_heads", "attn_out", "path", "attribution"])
def test_hooks_removed_when_a_forward_raises(toy, ioi, monkeypatch, method):
    """Make the last block raise in the first forward pass that runs with patching hooks."""
    with torch.no_grad():
        before = toy(ioi.clean)
    call, fail_at = {
        "act_heads": (lambda: act_patch_heads(toy, ioi), 3),  # after the clean and corrupt caching runs
        "attn_out": (lambda: act_patch_layer_out(toy, ioi), 3),
        "path": (lambda: path_patch(toy, ioi, [(0, 0)], receivers=[(1, 0)]), 3),
        "attribution": (lambda: attribution_patch_heads(toy, ioi), 2),  # after the source run
    }[method]
    block = toy.blocks[-1]
    original, calls = block.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            assert any(hp.fwd_hooks for hp in toy.hook_dict.values())  # patching hooks are active
            raise RuntimeError("forward failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", failing)
    with pytest.raises(RuntimeError, match="forward failed"):
        call()
    monkeypatch.undo()
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in toy.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(toy(ioi.clean), before)


@pytest.mark.bad_input
def test_building_a_batch_with_a_length_mismatch_is_one_clear_error(ioi):
    with pytest.raises(ValueError, match="same shape"):
        dataclasses.replace(ioi, corrupt=ioi.corrupt[:, :-1])


def test_clean_corrupt_length_mismatch_is_one_clear_error(toy, ioi):
    bad = dataclasses.replace(ioi)
    bad.corrupt = ioi.corrupt[:, :-1]  # mutated after construction
    for call in (act_patch_heads, attribution_patch_heads, path_patch, act_patch_resid):
        with pytest.raises(ValueError, match="same token shape"):
            call(toy, bad)


def test_identical_prompts_and_bad_arguments_raise(toy, ioi):
    same = dataclasses.replace(ioi, corrupt=ioi.clean.clone())
    with pytest.raises(ValueError, match="identical"):
        act_patch_heads(toy, same)
    with pytest.raises(ValueError, match="metric"):
        act_patch_heads(toy, ioi, metric="loss")
    with pytest.raises(ValueError, match="does not exist"):
        path_patch(toy, ioi, [(toy.cfg.n_layers, 0)])


@pytest.mark.bad_input
def test_unknown_direction_is_a_clear_error(toy, ioi):
    with pytest.raises(ValueError, match="direction"):
        act_patch_heads(toy, ioi, direction="sideways")
