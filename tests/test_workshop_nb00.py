"""The primer's checks (circuitlib.workshop.nb00): right for the solution, a named mistake for a plausible
wrong answer, "not done yet" for the stub; nothing raises."""

import math

import pytest
import torch

from circuitlib import workshop
from circuitlib.workshop import nb00


@pytest.fixture(scope="module")
def tokens(toy):
    from circuitlib.tasks import ioi_batch

    ioi = ioi_batch(toy.tokenizer, 2, seed=0)
    return ioi.clean[:1, : int(ioi.end[0]) + 1]


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def _pattern(model, cache, layer, head, *, ln_affine=True, scale=True, mask=True):
    ln = model.blocks[layer].ln1
    x = cache["normalized", layer, "ln1"][0]
    if ln_affine:
        x = x * ln.w + ln.b
    q = x @ model.W_Q[layer, head] + model.b_Q[layer, head]
    k = x @ model.W_K[layer, head] + model.b_K[layer, head]
    scores = q @ k.T / (model.cfg.d_head ** 0.5 if scale else 1.0)
    n = scores.shape[0]
    if mask:
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    return scores.softmax(-1)


def test_attention_pattern_check(toy, tokens, capsys):
    with torch.no_grad():
        assert nb00.check_attention_pattern(_pattern, toy, tokens).status == "correct"
        r = nb00.check_attention_pattern(lambda *a: _pattern(*a).T, toy, tokens)
        assert r.status == "wrong" and "transposed" in r.message
        r = nb00.check_attention_pattern(lambda *a: _pattern(*a, mask=False), toy, tokens)
        assert r.status == "wrong" and "later positions" in r.message
        r = nb00.check_attention_pattern(lambda *a: _pattern(*a, ln_affine=False), toy, tokens)
        assert r.status == "wrong" and "ln1.w" in r.message
        r = nb00.check_attention_pattern(lambda *a: _pattern(*a, scale=False), toy, tokens)
        assert r.status == "wrong" and "sqrt(d_head)" in r.message
        assert nb00.check_attention_pattern(stub, toy, tokens).status == "not done"
    assert workshop.NOT_DONE in capsys.readouterr().out


def test_ov_logits_check(toy):
    def solution(model, layer, head, tok):
        return model.W_E[tok] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U

    with torch.no_grad():
        assert nb00.check_ov_logits(solution, toy).status == "correct"
        r = nb00.check_ov_logits(lambda m, l, h, t: m.W_E[t] @ m.W_V[l, h] @ m.W_O[l, h], toy)
        assert r.status == "wrong" and "W_U" in r.message and "d_model" in r.message
        r = nb00.check_ov_logits(lambda *a: -solution(*a), toy)
        assert r.status == "wrong" and "sign" in r.message
        # adding the output bias b_O (MAPS uses none) gives other top tokens
        r = nb00.check_ov_logits(lambda m, l, h, t: solution(m, l, h, t) + m.b_O[l] @ m.W_U * 10, toy)
        assert r.status == "wrong" and "no biases" in r.message
        r = nb00.check_ov_logits(lambda m, l, h, t: m.W_E[t] @ m.W_O[l, h] @ m.W_V[l, h] @ m.W_U, toy)
        assert r.status == "wrong" and "raised" in r.message  # shapes do not chain: reported, not raised
    assert nb00.check_ov_logits(stub, toy).status == "not done"


def test_permutation_plan_check():
    def solution(n):
        count = math.factorial(n)
        return ("exact", count, 2 / count) if count <= 50_000 else ("monte carlo", 20_000, 1 / 20_001)

    assert nb00.check_permutation_plan(solution).status == "correct"
    r = nb00.check_permutation_plan(lambda n: ("exact", math.factorial(n), 1 / math.factorial(n)) if n < 9
                                    else solution(n))
    assert r.status == "wrong" and "reversal" in r.message
    r = nb00.check_permutation_plan(lambda n: ("monte carlo", 20_000, 1 / 20_000) if n >= 9 else solution(n))
    assert r.status == "wrong" and "+1" in r.message
    r = nb00.check_permutation_plan(lambda n: solution(n) if n < 8 else ("monte carlo", 20_000, 1 / 20_001))
    assert r.status == "wrong" and "40,320" in r.message and "'exact'" in r.message
    r = nb00.check_permutation_plan(lambda n: "exact")
    assert r.status == "wrong" and "tuple" in r.message
    assert nb00.check_permutation_plan(stub).status == "not done"


def test_reference_plan_is_circuitlibs():
    assert nb00.reference_plan(6) == ("exact", 720, pytest.approx(2 / 720))
    assert nb00.reference_plan(9) == ("monte carlo", 20_000, pytest.approx(1 / 20_001))


def test_a_check_result_prints_once_in_a_notebook():
    r = nb00.check_permutation_plan(stub)
    assert hasattr(r, "_ipython_display_") and r.status == "not done" and not r


def test_ov_check_uses_live_heads(toy):
    """Exercise 2 checks heads that carry signal on this checkpoint: a switched-off head's OV vector is ~0 and
    its top tokens (and the sign check) say nothing."""
    from circuitlib.interventions import live_heads

    assert {head for head, _ in nb00.OV_CASES} <= set(live_heads(toy))


def test_cases_are_heads_the_primer_names(toy):
    """The exercises' heads are the ones the primer's story is about on this checkpoint: 0.3 and 0.4 top
    the MAPS country -> capital scores, 0.2 tops name suppression and reads S2 from END in IOI, 1.2 reads
    one name from END. A new checkpoint that breaks this needs new cases (and new prose)."""
    from circuitlib.scoring import static_scores
    from circuitlib.tasks import ioi_batch

    with torch.no_grad():
        capital = static_scores(toy, "country_to_capital_wikidata")
        suppression = static_scores(toy, "name_copying", suppression=True)
        assert {(0, 3), (0, 4)} == set(capital.top(2))
        assert suppression.top(1) == [(0, 2)]
        assert [head for head, _ in nb00.OV_CASES] == [(0, 3), (0, 2), (0, 4)]
        ioi = ioi_batch(toy.tokenizer, 16, seed=0)
        _, cache = toy.run_with_cache(ioi.clean)
        rows, P = torch.arange(len(ioi)), ioi.positions
        end_row = lambda l, h: cache["pattern", l][rows, h, P["END"]]
        assert end_row(0, 2)[rows, P["S2"]].mean() > 0.4
        assert (end_row(1, 2)[rows, P["IO"]] + end_row(1, 2)[rows, P["S1"]]).mean() > 0.9
    assert set(nb00.PATTERN_CASES) == {(0, 2), (1, 2)}
