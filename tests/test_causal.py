"""Ablation experiments: MAPS causal check, batched ablation (circuitlib.causal, circuitlib.interventions)."""

import json

import pytest
import torch

from circuitlib import causal, report, scoring
from circuitlib.ablation import ablation_curves, run_ablated
from circuitlib.metrics import accuracy, logit_diff
from circuitlib.tasks import capital_batch, load_relation, task_batch
from circuitlib.types import HeadScores

RELATIONS = ["name_copying", "country_to_capital_wikidata"]

@pytest.mark.parametrize("at", ["end", "all"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_vectorised_ablation_curves_match_one_set_at_a_time(toy, kind, at):
    batch = capital_batch(toy.tokenizer, 24, seed=1)
    sets = [[], [(0, 1)], [(0, 1), (2, 3), (1, 5)], [(0, h) for h in range(toy.cfg.n_heads)]]
    curves = ablation_curves(toy, batch, sets, kind=kind, at=at, max_rows=48)  # forces several groups
    for heads, acc, ld in zip(sets, curves["accuracy"], curves["logit_diff"]):
        logits = run_ablated(toy, batch, heads, kind=kind, at=at)
        assert acc == pytest.approx(accuracy(logits, batch))
        assert ld == pytest.approx(float(logit_diff(logits, batch)), abs=1e-4)
    assert curves["logit_diff"][-1] != pytest.approx(curves["logit_diff"][0], abs=0.1)  # the sets do bite


def test_causal_check_is_jsonable_and_random_draws_avoid_relation_heads(toy):
    res = causal.causal_check(toy, "country_to_capital_wikidata", m_max=3, n_random=2, n_prompts=16)
    json.dumps(res)
    assert res["ablation"]["kind"] == "zero"
    assert len(res["top"]["accuracy"]) == 4 and res["m"] == [0, 1, 2, 3]
    # the toy's two valid relations share their top heads: no default control qualifies, a forced one
    # reports the overlap
    assert res["controls"] == {}
    forced = causal.causal_check(toy, "country_to_capital_wikidata", m_max=3, n_random=1, n_prompts=16,
                                  controls=["name_copying"])
    assert forced["controls"]["name_copying"]["shared_with_top"] == 3
    for draw in res["random"]["heads"]:
        assert not set(draw) & set(res["top"]["heads"])
    # m = 0 ablates nothing: every curve starts at the clean accuracy
    starts = [res["top"]["accuracy"][0]] + [d["accuracy"][0] for d in res["random"]["draws"]]
    assert len(set(starts)) == 1


def test_control_relations_must_barely_overlap():
    def hs(name, top):
        t = torch.zeros(2, 4)
        for rank, (l, h) in enumerate(top):
            t[l, h] = 1.0 - 0.1 * rank
        return HeadScores(t, "maps_static", name, "m")

    scores = {"r": hs("r", [(0, 0), (0, 1), (0, 2), (0, 3)]), "same": hs("same", [(0, 0), (0, 1), (0, 2), (1, 0)]),
              "one": hs("one", [(0, 0), (1, 1), (1, 2), (1, 3)]), "none": hs("none", [(1, 0), (1, 1), (1, 2), (1, 3)])}
    assert causal.control_relations("r", scores, m=4) == ["none", "one"]  # least overlap first
    assert causal.control_relations("r", scores, m=4, n=1) == ["none"]
    assert causal.control_relations("r", scores, m=4, max_shared=0) == ["none"]


def test_causal_check_needs_a_task(toy):
    with pytest.raises(ValueError, match="no task"):
        causal.causal_check(toy, "adj_antonym")


# ---------------------------------------------------------------------------------------------
# Reference heads, CLI, the trained toy model


@pytest.mark.parametrize("relation", RELATIONS)
def test_toy_relation_heads_matter_more_than_random_heads(toy, relation):
    """MAPS's causal claim on the embedded model: zero-ablating the top heads by static score at
    the last position takes the relation's task to chance; as many random heads barely matter."""
    res = causal.causal_check(toy, relation, n_random=5)
    s = res["summary"]
    assert res["task"] == causal.TASK_OF_RELATION[relation]
    assert s["clean_accuracy"] >= 0.95 and s["top_accuracy"] <= 0.6
    assert s["random_accuracy"] >= s["clean_accuracy"] - 0.1
    assert s["top_logit_diff"] < 0.25 * s["clean_logit_diff"] < 0.25 * s["random_logit_diff"] + 1


def test_relation_summary_is_what_the_report_stores(toy):
    out = report.relation_summary(toy, causal_kwargs=dict(m_max=2, n_random=2, n_prompts=16))
    text = json.dumps(out, allow_nan=False)  # strict JSON: undefined r is None, not NaN
    assert set(out) == set(RELATIONS) and text
    for name, entry in out.items():
        static = HeadScores.from_dict(entry["static"])
        assert entry["k"] == static.k == load_relation(name, toy.tokenizer).k
        assert entry["pairs_used"] == static.meta["pairs_used"]
        assert [t["head"] for t in entry["top_heads"]] == [f"{l}.{h}" for l, h in static.top(10)]
        for r in entry["r_static_dynamic"].values():
            assert r is None or -1.0 <= r <= 1.0
        assert entry["ablation"]["relation"] == name and entry["ablation"]["ablation"]["kind"] == "zero"
