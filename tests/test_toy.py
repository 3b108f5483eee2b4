"""The embedded model: held-out accuracy floors, findable structure, reproducible training."""

import pytest

from circuitlib.causal import top_vs_random
from circuitlib.metrics import accuracy, evaluate
from circuitlib.patching import act_patch_heads
from circuitlib.scoring import static_scores
from circuitlib.tasks import capital_batch, ioi_batch

N = 200


@pytest.fixture(scope="module")
def model(toy):
    return toy


@pytest.fixture(scope="module")
def batches(model):
    return {"ioi": ioi_batch(model.tokenizer, N, seed=11), "capitals": capital_batch(model.tokenizer, N, seed=11)}


def test_heldout_accuracy_floors(model, batches):
    for task, batch in batches.items():
        assert batch.meta["split"] == "heldout"
        r = evaluate(model, batch)
        assert r["accuracy"] >= 0.95, (task, r)
        assert r["logit_diff"] > 0 and r["corrupt_logit_diff"] < r["logit_diff"]


def test_capital_accuracy_holds_in_every_template(model):
    from circuitlib.tasks import CAPITAL_TEMPLATES

    for template in CAPITAL_TEMPLATES:
        b = capital_batch(model.tokenizer, 60, templates=[template], seed=5)
        # custom template lists have no held-out split: these are mixed seen/unseen combinations
        assert accuracy(model(b.clean), b) >= 0.9, template


def _important_heads(model, batch, n: int = 3) -> list:
    """The n heads whose activation patching (noising, all positions) hurts the logit difference most."""
    return act_patch_heads(model, batch, direction="noising").top(n)  # score = 1 - normalised patched metric


def _check_ablation_floor(model, batch) -> None:
    """The embedded model's ablation floor, stated once (issue 2, kept by issue 9):

    - the task's top-3 heads (activation patching), mean-ablated at every position (means over the
      corrupted prompts, BOS excluded), drop its top-1 accuracy by >= 0.5;
    - sets of 3 live heads from outside the top 3 cost < 0.1 top-1 and two-way accuracy on average
      (every such set when there are few);
    - after ablating the top 3, the two-way accuracy (chance 0.5) is not above chance: a one-sided
      exact binomial test does not reject 0.5 at the 0.05 level.
    """
    r = top_vs_random(model, batch, _important_heads(model, batch))
    assert r.clean["accuracy"] >= 0.95 and r.clean["top1_accuracy"] >= 0.95, r
    assert r.drop_top["top1_accuracy"] >= 0.5, r
    assert r.n_random > 0, f"no random control set could be drawn ({r.random_how}): the floor cannot be checked"
    assert r.drop_random["top1_accuracy"] < 0.1 and r.drop_random["accuracy"] < 0.1, r
    assert r.binomial_p_above_chance >= 0.05, r


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_floor_top3_heads_matter_random_heads_do_not(model, batches, task):
    _check_ablation_floor(model, batches[task])


def test_a_capital_head_is_visible_to_maps(model, batches):
    """Some head scores >= 0.5 on MAPS country -> capital and is among the capital task's top heads."""
    maps = static_scores(model, "country_to_capital_wikidata")
    strong = {h for h in maps.top(maps.n_layers * maps.n_heads) if maps[h] >= 0.5}
    assert strong & set(_important_heads(model, batches["capitals"])), maps.scores


def test_training_a_few_steps_lowers_the_loss():
    from circuitlib.toy.train import train

    _, losses = train(steps=30, batch_size=32, n_sentences=2000, progress=False)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


@pytest.mark.slow
def test_retraining_reproduces_the_floors():
    from circuitlib.toy.train import heldout_accuracy, train

    model, _ = train(progress=False)
    acc = heldout_accuracy(model, n=200)
    assert acc["ioi"] >= 0.95 and acc["capitals"] >= 0.95
    for make in (ioi_batch, capital_batch):
        _check_ablation_floor(model, make(model.tokenizer, N, seed=11))
    assert static_scores(model, "country_to_capital_wikidata").scores.max() >= 0.5


def test_a_short_training_run_is_deterministic_for_a_seed():
    """Two runs with the same seed give bit-identical weights and losses; another seed differs."""
    import torch

    from circuitlib.toy.train import train

    kw = dict(steps=8, batch_size=16, n_sentences=400, progress=False)
    a, la = train(seed=3, **kw)
    b, lb = train(seed=3, **kw)
    c, _ = train(seed=4, **kw)
    assert la == lb
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
