"""MAPS's causal check and top-vs-random ablation (circuitlib.causal) against the ablation oracle."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from circuitlib import causal
from circuitlib.interventions import live_heads
from circuitlib.scoring import static_scores_many
from circuitlib.tasks import capital_batch, task_batch
from circuitlib.tasks.maps_prompts import MAPS_CAUSAL_TEMPLATES, relation_prompt_batch, template_fits
from circuitlib.types import HeadScores
from builders import copying_scores_disjoint_from_capitals
from oracle import ablate

CAPITAL = "country_to_capital_wikidata"


def test_maps_m_rule():
    assert [causal.maps_m(n) for n in (24, 299, 300, 384, 499, 500, 999, 1000, 1440, 1500, 4000)] == \
        [30, 30, 50, 50, 50, 100, 100, 150, 150, 250, 250]


def test_default_m_is_maps_unless_too_large_for_the_model():
    assert causal.default_m(384) == 50 and causal.default_m(1440) == 150
    assert causal.default_m(24) == 3  # 30 > 24 / 4: gpt2-medium's ratio, round(24 * 50 / 384)


def test_relation_heads_positive_only_ties_in_authors_order():
    s = HeadScores(torch.tensor([[0.5, 0.0, 0.2], [0.2, 0.9, 0.0]]), "maps_static", "r", "m")
    # ranks: 1.1 (0.9), 0.0 (0.5), then the tie 0.2 between flat 2 (0.2) and flat 3 (1.0): higher flat index first
    assert causal.relation_heads(s, 10) == [(1, 1), (0, 0), (1, 0), (0, 2)]
    assert causal.relation_heads(s, 2) == [(1, 1), (0, 0)]


def test_capital_prompts_are_the_maps_template(toy):
    assert template_fits(toy.tokenizer, CAPITAL) and not template_fits(toy.tokenizer, "name_copying")
    b = relation_prompt_batch(CAPITAL, toy.tokenizer, bos=True)
    assert b.prompts[0] == MAPS_CAUSAL_TEMPLATES[CAPITAL].replace("<X>", b.prompts[0].split()[3])
    assert b.meta["bos"] and int(b.clean[0, 0]) == toy.tokenizer.bos_token_id
    assert (b.answer != b.wrong).all()
    assert len(b) == len(__import__("circuitlib").tasks.load_relation(CAPITAL, toy.tokenizer))


@pytest.fixture(scope="module")
def capital_check(toy):
    return causal.causal_check(toy, CAPITAL, n_random=3, n_extra_random=50, extra_tasks=["ioi"], n_prompts=40)


def test_causal_check_top_curve_matches_oracle(toy, capital_check):
    res = capital_check
    batch = causal.relation_prompts(toy, CAPITAL, n=40)
    heads = [tuple(map(int, h.split("."))) for h in res.top.heads]
    scores = static_scores_many(toy, [CAPITAL])[CAPITAL]
    assert heads == causal.relation_heads(scores, 3) and all(scores[h] > 0 for h in heads)
    for i in range(len(heads) + 1):
        diff, top1 = ablate(toy, batch, heads[:i], kind="zero", positions="end")
        assert res.top.top1_accuracy[i] == pytest.approx(float(top1.float().mean()), abs=1e-6)
        assert res.top.accuracy[i] == pytest.approx(float((diff > 0).float().mean()), abs=1e-6)
        assert res.top.logit_diff[i] == pytest.approx(float(diff.mean()), abs=2e-3)
    ioi = task_batch("ioi", toy.tokenizer, 40)
    _, top1 = ablate(toy, ioi, heads, kind="zero", positions="end")
    assert res.extra_tasks["ioi"].top1_accuracy[-1] == pytest.approx(float(top1.float().mean()), abs=1e-6)


def test_causal_check_random_draws_avoid_relation_heads_and_json(capital_check):
    res = capital_check
    assert len(res.random) == 3
    for c in res.random:
        assert len(c.heads) == res.m and not set(c.heads) & set(res.top.heads)
    assert res.ablation["kind"] == "zero" and res.ablation["positions"] == "end"
    d = json.loads(res.to_json())
    assert d["summary"]["m"] == res.m


def test_control_follows_the_papers_rule(toy):
    """A fabricated name-copying scoring on heads disjoint from the capital heads makes name copying a
    control (< 15% shared, clean top-1 within 0.2): the capital heads are then ablated on its prompts."""
    scores, cap_heads = copying_scores_disjoint_from_capitals(toy)
    res = causal.causal_check(toy, CAPITAL, scores=scores, n_random=1, n_extra_random=10, n_prompts=40)
    cand = {c["relation"]: c for c in res.control_candidates}
    copying = task_batch("copying", toy.tokenizer, 40)
    clean_top1 = float(ablate(toy, copying, [], kind="zero", positions="end")[1].float().mean())
    _, cap_top1 = ablate(toy, causal.relation_prompts(toy, CAPITAL, n=40), [], kind="zero", positions="end")
    accepted = abs(clean_top1 - float(cap_top1.float().mean())) < 0.2
    assert accepted, "precondition: the copying prompts' clean top-1 must be within 0.2 of the capital prompts'"
    assert cand["name_copying"]["accepted"] and cand["name_copying"]["shared"] == 0
    assert cand["name_copying"]["clean_top1_accuracy"] == pytest.approx(clean_top1, abs=1e-4)  # rounded to 4 places
    _, top1 = ablate(toy, copying, cap_heads, kind="zero", positions="end")
    assert res.controls["name_copying"].top1_accuracy[-1] == pytest.approx(float(top1.float().mean()), abs=1e-4)
    # with the real scores: the share of heads is counted here, and the rule decides acceptance from it
    res2 = causal.causal_check(toy, CAPITAL, n_random=1, n_extra_random=10, n_prompts=40)
    copy_heads = causal.relation_heads(static_scores_many(toy, ["name_copying"])["name_copying"], len(cap_heads))
    shared = len(set(copy_heads) & set(cap_heads)) / len(cap_heads)
    cand2 = {c["relation"]: c for c in res2.control_candidates}["name_copying"]
    assert cand2["shared"] == pytest.approx(shared, abs=1e-4) and cand2["accepted"] == (shared < 0.15 and accepted)
    assert ("name_copying" in res2.controls) == cand2["accepted"]


def test_causal_check_without_positive_heads_is_a_clear_error(toy):
    zero = {CAPITAL: HeadScores(torch.zeros(3, 8), "maps_static", CAPITAL, "toy")}
    with pytest.raises(ValueError, match="above 0"):
        causal.causal_check(toy, CAPITAL, scores=zero)


def test_top_vs_random_against_oracle(toy):
    import itertools

    batch = capital_batch(toy.tokenizer, 24, seed=1)
    layer0 = [h for h in live_heads(toy) if h[0] == 0]
    assert len(layer0) >= 4  # precondition: a top of two layer-0 heads, at least one pair of others
    top = layer0[:2]
    r = causal.top_vs_random(toy, batch, top, n_draws=5)
    # layer-matched: both heads from the live layer-0 heads outside the top; every pair when there are <= 5
    live = [h for h in layer0 if h not in top]
    sets = [list(c) for c in itertools.combinations(live, 2)]
    assert r.exhaustive == (len(sets) <= 5) and r.n_random == min(len(sets), 5)
    diff, top1 = ablate(toy, batch, top)
    assert r.top["top1_accuracy"] == pytest.approx(float(top1.float().mean()), abs=1e-4)  # rounded to 4 places
    assert r.top["accuracy"] == pytest.approx(float((diff > 0).float().mean()), abs=1e-4)
    n_correct = int((diff > 0).sum())
    assert r.binomial_p_above_chance == pytest.approx(stats.binom.sf(n_correct - 1, len(batch), 0.5))
    full = ablate(toy, batch, [])[1].float().mean()
    if r.exhaustive:
        drops = [float(full - ablate(toy, batch, s)[1].float().mean()) for s in sets]
        assert r.drop_random["top1_accuracy"] == pytest.approx(np.mean(drops), abs=1e-4)  # rounded to 4 places
        hits = sum(d >= r.drop_top["top1_accuracy"] - 1e-9 for d in drops)
        assert r.p_random_as_harmful == pytest.approx((1 + hits) / (1 + len(sets)))


def test_wrong_answer_pairing_never_shares_a_target_and_refuses_when_impossible():
    import numpy as np

    from circuitlib.tasks.maps_prompts import _different_target_pairing

    rng = np.random.default_rng(0)
    tgt = torch.tensor([5] * 74 + list(range(100, 279)))  # entity_to_pronoun-like: one target holds 74 of 253
    other = _different_target_pairing(tgt, rng)
    assert sorted(other.tolist()) == list(range(253))  # a permutation
    assert (tgt[torch.as_tensor(other)] != tgt).all()
    with pytest.raises(ValueError, match="share one target"):
        _different_target_pairing(torch.tensor([1, 1, 1, 2]), rng)


def test_top_vs_random_without_live_controls_runs_no_test(toy):
    """A pool of switched-off heads only (found here from the OV norms) gives no random set: no p-value and
    no random mean, never a comparison against dead heads."""
    ov = torch.einsum("lhde,lhem->lhdm", toy.W_V, toy.W_O).flatten(-2).norm(dim=-1).detach()
    # switched off = below live_heads' documented rule (OV norm < 1e-3 of the largest head's); the group lasso
    # leaves them near, not at, 0 (down to ~1e-2 here), so no absolute cut-off
    layers, n_heads = ov.shape
    heads = [(l, h) for l in range(layers) for h in range(n_heads)]
    live = [hd for hd in heads if ov[hd] >= 1e-3 * ov.max()]
    dead = [hd for hd in heads if hd not in live]
    assert live == live_heads(toy)  # the rule as documented
    assert dead and len(live) >= 6  # precondition: switched-off heads, and a top of 3 with 3 live heads left
    top, others = live[:3], live[3:6]
    batch = capital_batch(toy.tokenizer, 12, seed=1)
    r = causal.top_vs_random(toy, batch, top, pool=dead)
    assert r.n_random == 0 and r.p_random_as_harmful is None and r.random_mean == {} and r.drop_random == {}
    assert r.random_how.startswith("no control sets") and "live heads" in r.random_how
    diff, top1 = ablate(toy, batch, top)
    assert r.top["top1_accuracy"] == pytest.approx(float(top1.float().mean()), abs=1e-4)  # rounded to 4 places
    # a pool mixing dead and live heads draws from its live heads only: 3 live heads, one set
    mixed = dead + others
    r2 = causal.top_vs_random(toy, batch, top, pool=mixed)
    assert r2.n_random == 1 and r2.p_random_as_harmful is not None
    assert f"({len(dead)} switched-off heads of the given pool left out)" in r2.random_how
    _, top1_others = ablate(toy, batch, others)  # the one set is the live heads, the dead ones left out
    assert r2.random_mean["top1_accuracy"] == pytest.approx(float(top1_others.float().mean()), abs=1e-4)


def test_causal_check_extra_random_needs_live_heads(toy):
    """Relation heads covering so many live heads that fewer than m live heads are left outside them (and
    not enough per layer) leave no layer-matched or size-matched live set: the extra random baseline says so
    and has no p-value. m is at most half the heads, as MAPS's own random baseline needs m heads outside."""
    ov = torch.einsum("lhde,lhem->lhdm", toy.W_V, toy.W_O).flatten(-2).norm(dim=-1).detach()
    live = [(l, h) for l in range(3) for h in range(8) if ov[l, h] >= 1e-3 * ov.max()]  # live_heads' rule
    m = min(len(live) - 1, 12)
    assert len(live) - m < m, "precondition: fewer live heads outside the relation's than m"
    scores = torch.zeros(3, 8)
    for i, (l, h) in enumerate(live[:m]):
        scores[l, h] = 1.0 - 0.01 * i  # all > 0: MAPS takes heads with static score > 0
    res = causal.causal_check(toy, CAPITAL, scores={CAPITAL: HeadScores(scores, "maps_static", CAPITAL, "toy")},
                              m=m, n_random=1, n_extra_random=10, n_prompts=20)
    assert res.m == m
    assert res.extra_random["n_draws"] == 0 and res.extra_random["p_value"] is None
    assert res.extra_random["how"].startswith("no control sets")
    with pytest.raises(ValueError, match="at most half the heads"):
        causal.causal_check(toy, CAPITAL, scores={CAPITAL: HeadScores(torch.ones(3, 8), "maps_static", CAPITAL, "toy")},
                            m=13, n_random=1, n_prompts=20)


def test_causal_curves_by_label_in_any_metric(toy, capital_check):
    """The plot's curves: labels written out here, values in the two-way accuracy from the oracle."""
    from circuitlib.tasks import TASK_SPECS

    res = capital_check
    curves = causal.causal_curves(res, "accuracy")
    top_label = "top country to capital heads"
    extra_label = f"on {TASK_SPECS['ioi'].title} prompts (extra)"
    assert list(curves) == [top_label, "random heads (MAPS baseline)", extra_label]  # no control qualifies here
    heads = [tuple(map(int, h.split("."))) for h in res.top.heads]
    batch = causal.relation_prompts(toy, CAPITAL, n=40)
    expected = [float((ablate(toy, batch, heads[:i], kind="zero", positions="end")[0] > 0).float().mean())
                for i in range(len(heads) + 1)]
    assert curves[top_label] == pytest.approx(expected, abs=1e-6)
    ioi = task_batch("ioi", toy.tokenizer, 40)
    diff, _ = ablate(toy, ioi, heads, kind="zero", positions="end")
    assert curves[extra_label][-1] == pytest.approx(float((diff > 0).float().mean()), abs=1e-6)
    rand = curves["random heads (MAPS baseline)"]
    assert len(rand) == 3 and all(len(r) == len(heads) + 1 for r in rand)
    for r, c in zip(rand, res.random):
        drawn = [tuple(map(int, h.split("."))) for h in c.heads]
        assert r[-1] == pytest.approx(float((ablate(toy, batch, drawn, kind="zero", positions="end")[0] > 0)
                                            .float().mean()), abs=1e-6)
    d = json.loads(curves.to_json())
    assert d["metric"] == "accuracy" and d["relation"] == CAPITAL and set(d["extra_tasks"]) == {"ioi"}
    with pytest.raises(ValueError, match="unknown metric"):
        causal.causal_curves(res, "top5_accuracy")
