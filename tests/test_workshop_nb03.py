"""Checks of notebook 03's exercises: right for the solution, wrong (saying what) for plausible mistakes,
not done for a stub."""

import pytest
import torch

from circuitlib.workshop import nb03


def _stub(*args, **kwargs):
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Exercise 1: static score by hand


def static_score(W_E, W_V, W_O, W_U, src, tgt, k):
    m = W_E[src] @ W_V @ W_O @ W_U
    top = torch.topk(m, k + 1, dim=-1)
    target = m.gather(-1, tgt[:, None])[:, 0]
    return float(((top.indices[:, :k] == tgt[:, None]).any(-1) & (target > top.values[:, k])).float().mean())


def static_score_counting(W_E, W_V, W_O, W_U, src, tgt, k):
    """Another correct way: fewer than k other entries reach the target."""
    m = W_E[src] @ W_V @ W_O @ W_U
    target = m.gather(-1, tgt[:, None])
    return ((m >= target).sum(-1) - 1 < k).float().mean()  # a 0-d tensor is accepted too


def naive_topk(W_E, W_V, W_O, W_U, src, tgt, k):
    m = W_E[src] @ W_V @ W_O @ W_U
    return float((torch.topk(m, k, dim=-1).indices == tgt[:, None]).any(-1).float().mean())


def suppression_sign(W_E, W_V, W_O, W_U, src, tgt, k):
    return static_score(W_E, W_V, -W_O, W_U, src, tgt, k)


def fixed_k(W_E, W_V, W_O, W_U, src, tgt, k):
    return static_score(W_E, W_V, W_O, W_U, src, tgt, 1)


def hit_count(W_E, W_V, W_O, W_U, src, tgt, k):
    return static_score(W_E, W_V, W_O, W_U, src, tgt, k) * len(src)


def per_pair(W_E, W_V, W_O, W_U, src, tgt, k):
    m = W_E[src] @ W_V @ W_O @ W_U
    return (torch.topk(m, k, dim=-1).indices == tgt[:, None]).any(-1)


def no_W_O(W_E, W_V, W_O, W_U, src, tgt, k):
    return static_score(W_E, W_V @ W_V.T, torch.eye(W_E.shape[1]), W_U, src, tgt, k)


@pytest.mark.parametrize("fn", [static_score, static_score_counting])
def test_static_score_correct(fn, toy, capsys):
    r = nb03.check_static_score(fn, toy)
    assert r.status == "correct", r.message
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (naive_topk, "every logit ties"),
    (suppression_sign, "suppression score"),
    (fixed_k, "use the k you are given"),
    (hit_count, "the number of pairs that hit"),
    (per_pair, "return one number"),
    (no_W_O, "circuitlib's static_scores gives"),
])
def test_static_score_wrong(fn, expected, toy, capsys):
    r = nb03.check_static_score(fn, toy)
    assert r.status == "wrong" and expected in r.message, r.message
    assert "✗" in capsys.readouterr().out


def test_static_score_not_done(toy, capsys):
    assert nb03.check_static_score(_stub, toy).status == "not done"
    assert "not done yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Exercise 2: most suppressed tokens


def most_suppressed(model, layer, head, src, n=10):
    m = model.W_E[src] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U
    return torch.topk(-m, n).indices


def most_promoted(model, layer, head, src, n=10):
    m = model.W_E[src] @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_U
    return torch.topk(m, n).indices


def least_first(model, layer, head, src, n=10):
    return most_suppressed(model, layer, head, src, n).flip(0).tolist()


def too_few(model, layer, head, src, n=10):
    return most_suppressed(model, layer, head, src, n - 1)


def words_not_ids(model, layer, head, src, n=10):
    return [model.tokenizer.decode([int(i)]) for i in most_suppressed(model, layer, head, src, n)]


def test_most_suppressed_correct(toy):
    r = nb03.check_most_suppressed(most_suppressed, toy)
    assert r.status == "correct", r.message


@pytest.mark.parametrize("fn, expected", [
    (most_promoted, "pushes *up* most"),
    (least_first, "wrong order"),
    (too_few, "return exactly n = 10"),
    (words_not_ids, "return the token ids"),
])
def test_most_suppressed_wrong(fn, expected, toy):
    r = nb03.check_most_suppressed(fn, toy)
    assert r.status == "wrong" and expected in r.message, r.message


def test_most_suppressed_not_done(toy):
    assert nb03.check_most_suppressed(_stub, toy).status == "not done"


# ---------------------------------------------------------------------------------------------
# Exercise 3: attention from one position to another


def _pattern(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    return cache["pattern", layer]


def attention_to(model, tokens, query_pos, key_pos, layer, head):
    pat = _pattern(model, tokens, layer)
    return float(pat[torch.arange(tokens.shape[0]), head, query_pos, key_pos].mean())


def swapped(model, tokens, query_pos, key_pos, layer, head):
    return attention_to(model, tokens, key_pos, query_pos, layer, head)


def first_prompt_positions(model, tokens, query_pos, key_pos, layer, head):
    return float(_pattern(model, tokens, layer)[:, head, query_pos[0], key_pos[0]].mean())


def pre_softmax(model, tokens, query_pos, key_pos, layer, head):
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_attn_scores")
    return float(cache["attn_scores", layer][torch.arange(tokens.shape[0]), head, query_pos, key_pos].mean())


def all_heads(model, tokens, query_pos, key_pos, layer, head):
    return float(_pattern(model, tokens, layer)[torch.arange(tokens.shape[0]), :, query_pos, key_pos].mean())


def test_attention_to_correct(toy):
    r = nb03.check_attention_to(attention_to, toy)
    assert r.status == "correct", r.message


@pytest.mark.parametrize("fn, expected", [
    (swapped, "[batch, head, query, key]"),
    (first_prompt_positions, "first prompt's positions"),
    (pre_softmax, "not a probability"),
    (all_heads, "mean over all heads"),
])
def test_attention_to_wrong(fn, expected, toy):
    r = nb03.check_attention_to(fn, toy)
    assert r.status == "wrong" and expected in r.message, r.message


def test_attention_to_not_done(toy):
    assert nb03.check_attention_to(_stub, toy).status == "not done"


def test_checks_never_raise_on_broken_code(toy):
    def broken(*args, **kwargs):
        return 1 / 0

    for check in (nb03.check_static_score, nb03.check_most_suppressed, nb03.check_attention_to):
        r = check(broken, toy)
        assert r.status == "wrong" and "ZeroDivisionError" in r.message
