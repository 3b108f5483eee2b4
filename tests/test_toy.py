"""The embedded model: held-out accuracy floors, findable structure, reproducible training."""

import random

import pytest

from circuitlib.ablation import ablation_curves
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
    assert len(CAPITAL_TEMPLATES) >= 3


def _important_heads(model, batch, n: int = 3) -> list:
    """The n heads whose activation patching (noising, all positions) hurts the logit difference most."""
    return act_patch_heads(model, batch, direction="noising").top(n)  # score = 1 - normalised patched metric


def _top3_vs_random(model, batch) -> tuple[float, float, list]:
    """Accuracy drop when mean-ablating (all positions, means over the corrupted prompts) the 3 most
    important heads, and the mean drop over 30 draws of 3 random heads."""
    top3 = _important_heads(model, batch)
    rng = random.Random(0)
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    draws = [rng.sample(heads, 3) for _ in range(30)]
    acc = ablation_curves(model, batch, [[], top3, *draws], kind="mean", at="all")["accuracy"]
    return acc[0] - acc[1], sum(acc[0] - a for a in acc[2:]) / len(draws), top3


@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_important_heads_matter_far_more_than_random_heads(model, batches, task):
    drop_top, drop_random, top3 = _top3_vs_random(model, batches[task])
    assert drop_random < 0.1, (task, drop_random)
    assert drop_top > 0.15 and drop_top > 3 * drop_random, (task, top3, drop_top, drop_random)


@pytest.mark.xfail(strict=True, reason="known gap of the shipped checkpoint (see MODEL_CARD.md): top-3 ablation "
                   "drops IOI accuracy by ~0.49 and capital accuracy by ~0.2, short of the 0.5 floor")
@pytest.mark.parametrize("task", ["ioi", "capitals"])
def test_floor_top3_ablation_drops_accuracy_by_half(model, batches, task):
    drop_top, _, top3 = _top3_vs_random(model, batches[task])
    assert drop_top >= 0.5, (task, top3, drop_top)


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
def test_retraining_reproduces_the_floors(tmp_path):
    from circuitlib.toy.train import heldout_accuracy, train

    model, _ = train(progress=False)
    acc = heldout_accuracy(model, n=200)
    assert acc["ioi"] >= 0.95 and acc["capitals"] >= 0.95
