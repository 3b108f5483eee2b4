"""Notebook 01's checks (circuitlib.workshop.nb01): right for the solution, a named mistake for a plausible
wrong answer, "not done yet" for the stub; nothing raises."""

import pytest
import torch

from circuitlib import workshop
from circuitlib.tasks import ioi_batch
from circuitlib.workshop import nb01


@pytest.fixture(scope="module")
def ioi(toy):
    return ioi_batch(toy.tokenizer, 8, seed=0)


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def positions(words, names):
    where = {}
    for i, w in enumerate(words):
        if w.strip() in names:
            where.setdefault(w.strip(), []).append(i)
    s = next(n for n, p in where.items() if len(p) == 2)
    io = next(n for n, p in where.items() if len(p) == 1)
    return {"IO": where[io][0], "S1": where[s][0], "S2": where[s][1], "END": len(words) - 1}


def test_find_positions_check(toy, ioi, capsys):
    assert nb01.check_find_positions(positions, toy, ioi).status == "correct"

    def baba_only(words, names):  # assumes the IO name is always the second name
        idx = [i for i, w in enumerate(words) if w.strip() in names]
        return {"IO": idx[1], "S1": idx[0], "S2": idx[2], "END": len(words) - 1}

    r = nb01.check_find_positions(baba_only, toy, ioi)
    assert r.status == "wrong" and "ABBA" in r.message and "swapped" in r.message
    r = nb01.check_find_positions(lambda w, n: positions(w[1:], n), toy, ioi)  # BOS dropped
    assert r.status == "wrong" and "BOS" in r.message
    r = nb01.check_find_positions(lambda w, n: {**positions(w, n), "END": len(w)}, toy, ioi)
    assert r.status == "wrong" and "END should be" in r.message
    r = nb01.check_find_positions(lambda w, n: [1, 2, 3, 4], toy, ioi)
    assert r.status == "wrong" and "dict" in r.message
    assert nb01.check_find_positions(stub, toy, ioi).status == "not done"
    assert workshop.NOT_DONE in capsys.readouterr().out


def corrupted(model, prompt, io, s, new, *, replace="second", bos=True, sign=1):
    words = prompt.split(" ")
    hits = [i for i, w in enumerate(words) if w == s]
    if replace == "second":
        words[hits[-1]] = new
    elif replace == "first":
        words[hits[0]] = new
    else:
        words = [new if w == s else w for w in words]
    text = " ".join(words)
    with torch.no_grad():
        logits = model(model.to_tokens(text, prepend_bos=bos))[0, -1]
    return text, sign * float(logits[model.to_single_token(" " + io)] - logits[model.to_single_token(" " + s)])


def test_corrupted_logit_diff_check(toy, ioi):
    assert nb01.check_corrupted_logit_diff(corrupted, toy, ioi).status == "correct"
    r = nb01.check_corrupted_logit_diff(lambda *a: corrupted(*a, replace="first"), toy, ioi)
    assert r.status == "wrong" and "first mention" in r.message
    r = nb01.check_corrupted_logit_diff(lambda *a: corrupted(*a, replace="both"), toy, ioi)
    assert r.status == "wrong" and "both mentions" in r.message
    r = nb01.check_corrupted_logit_diff(lambda *a: corrupted(*a, sign=-1), toy, ioi)
    assert r.status == "wrong" and "sign" in r.message
    r = nb01.check_corrupted_logit_diff(lambda *a: corrupted(*a, bos=False), toy, ioi)
    assert r.status == "wrong" and "without BOS" in r.message

    def clean_value(model, prompt, io, s, new):
        return corrupted(model, prompt, io, s, new)[0], corrupted(model, prompt, io, s, s)[1]

    r = nb01.check_corrupted_logit_diff(clean_value, toy, ioi)
    assert r.status == "wrong" and "clean prompt" in r.message
    assert nb01.check_corrupted_logit_diff(stub, toy, ioi).status == "not done"


def test_cases_come_from_the_batch(toy, ioi):
    cases = nb01._cases(toy, ioi)
    for c in cases:
        i = c["row"]
        assert ioi.corrupt_prompts[i] == corrupted(toy, c["prompt"], c["io"], c["s"], c["new"])[0]
        assert c["io"] != c["s"] != c["new"]
