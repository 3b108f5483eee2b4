"""Notebook 05's checks (circuitlib.workshop.nb05): right for the solution, a named mistake for a plausible
wrong answer, "not done yet" for the stub; nothing raises."""

import pytest
import torch

from circuitlib import workshop
from circuitlib.tasks import ioi_batch
from circuitlib.workshop import nb05


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def test_name_suppression_head_check(toy, capsys):
    from circuitlib.scoring import static_scores

    # the expected head, derived here from the suppression scores over all heads, not from the check
    supp = static_scores(toy, "name_copying", suppression=True).scores
    flat = int(supp.flatten().argmax())
    best = f"{flat // toy.cfg.n_heads}.{flat % toy.cfg.n_heads}"
    assert nb05.check_name_suppression_head(lambda: best, toy).status == "correct"
    assert nb05.check_name_suppression_head(lambda: f" {best} ", toy).status == "correct"
    r = nb05.check_name_suppression_head(lambda: "0.0", toy)  # the top name-copying head: the opposite
    assert r.status == "wrong" and "copies names" in r.message and "minus" in r.message
    r = nb05.check_name_suppression_head(lambda: "0.3", toy)  # switched off
    assert r.status == "wrong" and "switched off" in r.message
    r = nb05.check_name_suppression_head(lambda: (1, 6), toy)
    assert r.status == "wrong" and "string" in r.message
    r = nb05.check_name_suppression_head(lambda: "7.1", toy)
    assert r.status == "wrong" and "does not exist" in r.message
    r = nb05.check_name_suppression_head(lambda: "one point six", toy)
    assert r.status == "wrong" and "layer.head" in r.message
    assert nb05.check_name_suppression_head(stub, toy).status == "not done"
    assert workshop.NOT_DONE in capsys.readouterr().out


@pytest.fixture(scope="module")
def ioi(toy):
    return ioi_batch(toy.tokenizer, 8, seed=0)


@torch.no_grad()
def attention(model, batch, query, key, *, mistake=None):
    _, cache = model.run_with_cache(batch.clean)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for b in range(len(batch)):  # one prompt at a time, no fancy indexing: an independent reference
        q, k = int(batch.positions[query][b]), int(batch.positions[key][b])
        if mistake == "transposed":
            q, k = k, q
        if mistake == "padded end" and query == "END":
            q = batch.clean.shape[1] - 1
        for l in range(model.cfg.n_layers):
            out[l] += cache["pattern", l][b, :, q, k]
    return out if mistake == "sum" else out / len(batch)


def test_mean_attention_check(toy, ioi):
    assert len(set(int(e) for e in ioi.end)) > 1  # prompts of different lengths: the padding mistake shows
    assert nb05.check_mean_attention(attention, toy, ioi).status == "correct"
    r = nb05.check_mean_attention(lambda *a: attention(*a, mistake="transposed"), toy, ioi)
    assert r.status == "wrong" and "[key, query]" in r.message
    r = nb05.check_mean_attention(lambda *a: attention(*a, mistake="padded end"), toy, ioi)
    assert r.status == "wrong" and "padded" in r.message
    r = nb05.check_mean_attention(lambda *a: attention(*a, mistake="sum"), toy, ioi)
    assert r.status == "wrong" and "summed" in r.message
    r = nb05.check_mean_attention(lambda *a: attention(*a).T, toy, ioi)
    assert r.status == "wrong" and "[head, layer]" in r.message
    assert nb05.check_mean_attention(stub, toy, ioi).status == "not done"
