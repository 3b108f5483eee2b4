"""The intervention engine against an oracle written here: plain run_with_cache for the means (an
explicit position mask), a hook written in this file, full-model logits read at END."""

import itertools
import math

import pytest
import torch

from circuitlib.interventions import (
    Ablation,
    live_heads,
    position_mask,
    readout,
    run_ablations,
    sample_head_sets,
)
from circuitlib.tasks import task_batch
from oracle import ablate


@pytest.fixture(scope="module")
def batch(toy):
    return task_batch("ioi", toy.tokenizer, 12, seed=3)


@pytest.mark.parametrize("kind,positions,bos", [("mean", "all", False), ("mean", "all", True), ("mean", "end", False),
                                                ("zero", "all", False), ("zero", "end", False), ("zero", "all", True)])
def test_run_ablations_matches_hook_oracle(toy, batch, kind, positions, bos):
    sets = [[], [(0, 0)], [(0, 1), (1, 6)], [(0, 0), (0, 5), (1, 6), (2, 3)]]
    run = run_ablations(toy, batch, sets, Ablation(kind=kind, positions=positions, bos=bos))
    for i, heads in enumerate(sets):
        diff, top1 = ablate(toy, batch, heads, kind=kind, positions=positions, bos=bos)
        torch.testing.assert_close(run.logit_diff[i], diff, atol=2e-4, rtol=1e-4)
        assert torch.equal(run.top1[i], top1)


def test_chunking_does_not_change_results(toy, batch, monkeypatch):
    import circuitlib.interventions as iv

    sets = [[(0, h)] for h in range(8)] + [[(1, 6), (0, 0)]]
    whole = run_ablations(toy, batch, sets)
    monkeypatch.setattr(iv, "MAX_TOKENS", batch.clean.numel() * 2)  # two copies per forward
    parts = run_ablations(toy, batch, sets)
    torch.testing.assert_close(whole.logit_diff, parts.logit_diff, atol=1e-5, rtol=1e-5)


def test_template_means_and_resample_by_hand(toy):
    from circuitlib.tasks import BABA_TEMPLATES

    batch = task_batch("ioi", toy.tokenizer, 8, seed=1, templates=BABA_TEMPLATES[:2])
    heads = [(0, 0), (1, 6)]
    # template means: for every prompt, the mean of the corrupted prompts of its template, per position
    _, cache = toy.run_with_cache(batch.corrupt)
    groups = {}
    for i, t in enumerate(batch.template):
        groups.setdefault(t, []).append(i)
    assert any(len(g) > 1 for g in groups.values()), "the test needs a template with several prompts"

    def run_with(values):
        def make(l, h):
            def hook(z, hook):
                z = z.clone()
                for b in range(len(batch)):
                    for p in range(1, int(batch.end[b]) + 1):
                        z[b, p, h] = values[(l, h)][b, p]
                return z
            return hook
        logits = toy.run_with_hooks(batch.clean, fwd_hooks=[(f"blocks.{l}.attn.hook_z", make(l, h)) for l, h in heads])
        last = logits[torch.arange(len(batch)), batch.end]
        return last[torch.arange(len(batch)), batch.answer] - last[torch.arange(len(batch)), batch.wrong]

    means = {}
    for l, h in heads:
        z = cache[f"blocks.{l}.attn.hook_z"][:, :, h]
        v = torch.empty_like(z)
        for g in groups.values():
            v[g] = z[g].mean(0)
        means[(l, h)] = v
    run = run_ablations(toy, batch, [heads], Ablation(means="template"))
    torch.testing.assert_close(run.logit_diff[0], run_with(means), atol=2e-4, rtol=1e-4)
    # resample: every prompt takes another prompt of its template (never itself when the group has two or more)
    res = run_ablations(toy, batch, [heads], Ablation(kind="resample", seed=5))
    assert not torch.allclose(res.logit_diff[0], run.logit_diff[0])


def test_position_mask_excludes_padding_and_bos(toy, batch):
    m = position_mask(batch, Ablation())
    assert not m[:, 0].any()
    assert m.sum() == int((batch.end).sum())  # positions 1..END of every prompt


def test_readout_equals_full_forward(toy, batch):
    logits, cache = toy.run_with_cache(batch.clean)
    resid = cache[f"blocks.{toy.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(readout(toy, resid), logits, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_after_an_error(toy, batch):
    with pytest.raises(ValueError, match="does not exist"):
        run_ablations(toy, batch, [[(9, 0)]])
    clean = toy(batch.clean)
    run = run_ablations(toy, batch, [[]])
    last = clean[torch.arange(len(batch)), batch.end]
    torch.testing.assert_close(run.logit_diff[0], last[torch.arange(len(batch)), batch.answer]
                               - last[torch.arange(len(batch)), batch.wrong], atol=1e-5, rtol=1e-5)
    assert all(not hp.fwd_hooks for hp in toy.hook_dict.values())


@pytest.mark.bad_input
def test_unknown_ablation_fields_are_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        Ablation(kind="mena")
    with pytest.raises(ValueError, match="positions"):
        Ablation(positions="END")


def test_bad_ablation_specs_are_clear_errors():
    with pytest.raises(ValueError, match="per position"):
        Ablation(kind="resample", positions="end")


def test_live_heads_are_the_heads_with_weights(toy):
    ov = torch.einsum("lhde,lhem->lhdm", toy.W_V, toy.W_O).flatten(-2).norm(dim=-1)
    live = live_heads(toy)
    for l in range(toy.cfg.n_layers):
        for h in range(toy.cfg.n_heads):
            assert ((l, h) in live) == bool(ov[l, h] >= 1e-3 * ov.max())  # the documented rule, full product


def test_sampler_layer_matched_excludes_and_is_exhaustive_when_small(toy):
    pool = [(l, h) for l in range(3) for h in range(8)]
    like = [(0, 0), (0, 1), (1, 6)]
    draws = sample_head_sets(toy, 50, like=like, pool=pool, exclude=like, seed=0, live_only=False)
    assert len(draws) == 50 and not draws.exhaustive
    for s in draws:
        assert sorted(l for l, _ in s) == [0, 0, 1]
        assert not set(s) & set(like) and len(set(s)) == 3
    small = sample_head_sets(toy, 1000, like=like, pool=pool, exclude=like, live_only=False)
    assert small.exhaustive and len(small) == math.comb(6, 2) * math.comb(7, 1)
    assert len({tuple(s) for s in small}) == len(small)
    uni = sample_head_sets(toy, 10, size=2, pool=[(0, 0), (0, 1), (0, 2)], exclude=[(0, 2)], live_only=False)
    assert uni.exhaustive and [sorted(s) for s in uni] == [[(0, 0), (0, 1)]]
    with pytest.raises(ValueError, match="layer 2 has 0"):
        sample_head_sets(toy, 5, like=[(2, 0)], pool=pool, exclude=[(2, h) for h in range(8)], live_only=False)


# ---------------------------------------------------------------------------------------------
# Control sets never hold a switched-off head (hand-built model: the live heads are known by construction)

LIVE_BY_HAND = [(0, 0), (0, 1), (0, 2), (1, 0)]
DEAD_BY_HAND = [(0, 3), (1, 1), (1, 2), (1, 3)]


@pytest.fixture(scope="module")
def half_dead(toy):
    """2 layers x 4 heads, random weights; heads 0.3, 1.1, 1.2, 1.3 switched off (W_V and W_O zeroed)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=toy.cfg.n_ctx,
                                  d_vocab=toy.cfg.d_vocab, act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg, tokenizer=toy.tokenizer)
    with torch.no_grad():
        for l, h in DEAD_BY_HAND:
            model.blocks[l].attn.W_V[h].zero_()
            model.blocks[l].attn.W_O[h].zero_()
    model.eval()
    return model


def test_the_hand_built_model_has_the_live_heads_it_was_built_with(half_dead):
    assert sorted(live_heads(half_dead)) == LIVE_BY_HAND


def test_control_sets_layer_matched_then_size_matched_from_live_heads(half_dead):
    from circuitlib.interventions import control_sets

    d = control_sets(half_dead, [(0, 0)], 100)
    assert d.pool == [(0, 1), (0, 2), (1, 0)]  # live, minus the head under test; never 0.3
    assert sorted(map(tuple, d.sets)) == [((0, 1),), ((0, 2),)] and d.exhaustive
    assert "layer-matched to 0.0" in d.how and "not layer-matched" not in d.how
    # layer 1 keeps no other live head (1.1-1.3 are dead): size-matched live heads, with the reason
    d = control_sets(half_dead, [(1, 0)], 100)
    assert sorted(map(tuple, d.sets)) == [((0, 0),), ((0, 1),), ((0, 2),)]
    assert "not layer-matched: layer 1 has 0 other live heads in the pool, needs 1" in d.how


def test_control_sets_run_no_test_instead_of_using_dead_heads(half_dead):
    """0.0, 0.1 under test and 1.0 excluded leave one live head (0.2) for sets of 2: no control set. The old
    fallback drew the C(5, 2) = 10 pairs of 0.2 and the four dead heads."""
    from circuitlib.interventions import control_sets

    d = control_sets(half_dead, [(0, 0), (0, 1)], 100, also_exclude=[(1, 0)])
    assert len(d) == 0 and d.sets == [] and d.pool == [(0, 2)]
    assert d.how.startswith("no control sets") and "only 1 live head outside the heads under test and 1.0 (0.2)" in d.how
    assert d.meta["no_test"] in d.how


@pytest.mark.parametrize("size", [1, 2, 3])
def test_control_sets_property_over_every_head_set(half_dead, size):
    """For every head set of ``size`` heads: no drawn set holds a dead head or a head under test, and there is
    no control exactly when fewer than ``size`` live heads lie outside the set (counted here by hand)."""
    from circuitlib.interventions import control_sets

    every = LIVE_BY_HAND + DEAD_BY_HAND
    for heads in itertools.combinations(every, size):
        d = control_sets(half_dead, list(heads), 50, seed=1)
        outside_live = [h for h in LIVE_BY_HAND if h not in heads]
        assert (len(d) == 0) == (len(outside_live) < size), heads
        for s in d.sets:
            assert len(s) == size and set(s) <= set(outside_live), (heads, s)


def test_sampler_cuts_a_given_pool_to_live_heads(half_dead):
    every = LIVE_BY_HAND + DEAD_BY_HAND
    d = sample_head_sets(half_dead, 100, size=1, pool=every, exclude=[(0, 0)])
    assert sorted(map(tuple, d.sets)) == [((0, 1),), ((0, 2),), ((1, 0),)]
    assert "4 switched-off heads of the given pool left out" in d.how
    raw = sample_head_sets(half_dead, 100, size=1, pool=every, exclude=[(0, 0)], live_only=False)
    assert len(raw) == 7 and {h for s in raw for h in s} == set(every) - {(0, 0)}
    with pytest.raises(ValueError, match="layer 1 has 0 other live heads"):
        sample_head_sets(half_dead, 5, like=[(1, 0)], pool=every, exclude=[(1, 0)])


def test_run_ablations_shows_a_bar_with_a_total_only_when_asked(toy, capsys, monkeypatch):
    """Under ``show_progress`` a multi-chunk run prints a tqdm bar whose total is the number of chunks
    (so it has an ETA); without it, nothing; the values do not change."""
    from circuitlib import interventions
    from circuitlib.interventions import show_progress

    batch = task_batch("ioi", toy.tokenizer, 4)
    sets = [[], [(0, 0)], [(1, 6)], [(0, 0), (1, 6)], [(0, 1)]]
    quiet = run_ablations(toy, batch, sets, Ablation())
    assert "ablation runs" not in capsys.readouterr().err
    B, S = batch.clean.shape
    monkeypatch.setattr(interventions, "MAX_TOKENS", 2 * B * S)  # 2 copies per chunk: 3 chunks for 5 sets
    with show_progress(True):
        shown = run_ablations(toy, batch, sets, Ablation())
    err = capsys.readouterr().err
    assert "ablation runs" in err and "0/3" in err, err  # total known from the start: an ETA
    assert torch.equal(shown.logit_diff, quiet.logit_diff) and torch.equal(shown.top1, quiet.top1)
