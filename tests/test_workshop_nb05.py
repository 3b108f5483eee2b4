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
    from circuitlib.scoring import load_relation, static_scores

    # the expected head, derived here from the suppression scores over all heads, not from the check
    supp = static_scores(toy, "name_copying", suppression=True).scores
    flat = int(supp.flatten().argmax())
    best = f"{flat // toy.cfg.n_heads}.{flat % toy.cfg.n_heads}"
    assert nb05.check_name_suppression_head(lambda: best, toy).status == "correct"
    assert nb05.check_name_suppression_head(lambda: f" {best} ", toy).status == "correct"
    # the answer by hand: for each name, is the name the token its OV circuit pushes down hardest?
    words = load_relation("name_copying", toy.tokenizer).src_words
    ids = [toy.tokenizer.encode(" " + w) for w in words]
    assert all(len(i) == 1 for i in ids)  # one token per name, as MAPS's filter requires
    names = [i[0] for i in ids]
    with torch.no_grad():
        ov = torch.einsum("nd,lhde,lhem,mv->lhnv", toy.W_E[names], toy.W_V, toy.W_O, toy.W_U)
        by_hand = (ov.argmin(-1) == torch.tensor(names)).float().mean(-1)
    assert f"{int(by_hand.argmax()) // toy.cfg.n_heads}.{int(by_hand.argmax()) % toy.cfg.n_heads}" == best
    copying = static_scores(toy, "name_copying").scores.flatten()
    flat = int(copying.argmax())  # the top name-copying head: the opposite
    r = nb05.check_name_suppression_head(lambda: f"{flat // toy.cfg.n_heads}.{flat % toy.cfg.n_heads}", toy)
    assert r.status == "wrong" and "copies names" in r.message and "minus" in r.message
    # the runner-up (IOI's second head on the embedded model): it suppresses names, but for far fewer names
    second = int(supp.flatten().argsort(descending=True)[1])
    assert 0.05 < supp.flatten()[second] < 0.5 * supp.flatten().max()
    r = nb05.check_name_suppression_head(lambda: f"{second // toy.cfg.n_heads}.{second % toy.cfg.n_heads}", toy)
    assert r.status == "wrong" and "far more names" in r.message
    # a switched-off head: OV norm from the full product, smallest of all heads
    ov_norm = (toy.W_V @ toy.W_O).norm(dim=(-2, -1)).flatten()
    off = int(ov_norm.argmin())
    assert ov_norm[off] < 1e-3 * ov_norm.max()
    r = nb05.check_name_suppression_head(lambda: f"{off // toy.cfg.n_heads}.{off % toy.cfg.n_heads}", toy)
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


def _ld(model, tokens, batch, hooks=()):
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks))
    rows = torch.arange(len(batch))
    last = logits[rows, batch.end]
    return float((last[rows, batch.answer] - last[rows, batch.wrong]).mean())


def zero_scores(model, batch, *, direction="noising", progress=False, mode="solution"):
    """Zero-ablation written out with one plain hook per head (independent of interventions.run_ablations)."""
    clean, corrupt = _ld(model, batch.clean, batch), _ld(model, batch.corrupt, batch)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            def hook(z, hook, h=h):
                z = z.clone()
                z[:, :, h] = 0
                return z
            ablated = _ld(model, batch.clean, batch, [(f"blocks.{l}.attn.hook_z", hook)])
            out[l, h] = {"solution": (clean - ablated) / (clean - corrupt), "raw": clean - ablated,
                         "kept": (ablated - corrupt) / (clean - corrupt), "sign": (ablated - clean) / (clean - corrupt)}[mode]
    return out


def test_zero_ablation_check(toy, ioi):
    reference = nb05.zero_ablation_scorer(toy, ioi)
    assert reference.method == "zero_ablation" and reference.meta["direction"].startswith("none")
    assert torch.allclose(reference.scores, zero_scores(toy, ioi), atol=1e-4)  # the library's version, checked
    assert nb05.check_zero_ablation_scores(zero_scores, toy, ioi).status == "correct"
    for mode, words in (("raw", "raw logits"), ("kept", "1 minus"), ("sign", "sign")):
        r = nb05.check_zero_ablation_scores(lambda *a, mode=mode, **k: zero_scores(*a, mode=mode, **k), toy, ioi)
        assert r.status == "wrong" and words in r.message, (mode, r.message)
    r = nb05.check_zero_ablation_scores(lambda m, b, **k: nb05._mean_variant(m, b)[0], toy, ioi)
    assert r.status == "wrong" and "mean-ablation" in r.message
    r = nb05.check_zero_ablation_scores(lambda *a, **k: zero_scores(*a, **k).T, toy, ioi)
    assert r.status == "wrong" and "shape" in r.message
    assert nb05.check_zero_ablation_scores(stub, toy, ioi).status == "not done"


def test_zero_ablation_scorer_plugs_into_the_registry_and_the_explorer(toy, ioi, monkeypatch):
    from circuitlib.circuits import HEAD_SCORERS, register_scorer
    from circuitlib.types import HeadScores
    from circuitlib.widgets import Explorer

    monkeypatch.setattr("circuitlib.circuits.HEAD_SCORERS", dict(HEAD_SCORERS))
    register_scorer("zero_ablation", nb05.zero_ablation_scorer)
    ex = Explorer(toy, {"x": HeadScores(torch.zeros(3, 8), "x", "x", "toy")}, {"ioi": ioi})
    row = ex.patching("ioi", "0.2")["methods"]["zero_ablation"]  # IOI's top head on the embedded model
    assert row["score"] == pytest.approx(float(zero_scores(toy, ioi)[0, 2]), abs=1e-3)
    assert row["direction"].startswith("none")
