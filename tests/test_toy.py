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
    assert len(CAPITAL_TEMPLATES) >= 3


def _important_heads(model, batch, n: int = 3) -> list:
    """The n heads whose activation patching (noising, all positions) hurts the logit difference most."""
    return act_patch_heads(model, batch, direction="noising").top(n)  # score = 1 - normalised patched metric


def _check_ablation_floor(model, batch) -> None:
    """The issue's floor: top-3 ablation drops accuracy by >= 0.5, 3 random heads by < 0.1 on average.

    Top-1 accuracy (the answer is the model's first choice) must drop by >= 0.5. The two-way accuracy
    (IO beats S; the capital beats the corrupt country's capital) has chance level 0.5, so from 1.0 a
    drop of 0.5 is a drop to chance, the most a symmetric ablation can do: it must end at chance, up
    to sampling noise (0.5 + 0.05 on 200 prompts, about 1.4 standard errors).
    Mean-ablation at all positions (means over the corrupted prompts), 30 draws of 3 random heads.
    """
    r = top_vs_random(model, batch, _important_heads(model, batch))
    for metric in ("accuracy", "top1_accuracy"):
        assert r[metric]["clean"] >= 0.95, (batch.task, r)
        assert r[metric]["drop_random"] < 0.1, (batch.task, metric, r)
    assert r["top1_accuracy"]["drop_top"] >= 0.5, (batch.task, r)
    assert r["accuracy"]["top"] <= 0.55, (batch.task, r)


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
