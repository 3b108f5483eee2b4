"""Checks of notebook 02's exercises: correct for the solution, wrong (saying what is wrong) for
plausible mistakes, not done for a stub; they never raise."""

import pytest
import torch

from circuitlib.metrics import logit_diff
from circuitlib.workshop import nb02


# ---------------------------------------------------------------------------------------------
# Exercise 1: the solution, and the same code with one plausible mistake each


def patch_one_head(model, batch, layer, head, *, direction="noising", whole_layer=False, output="effect"):
    name = f"blocks.{layer}.attn.hook_z"
    base, source = (batch.clean, batch.corrupt) if direction == "noising" else (batch.corrupt, batch.clean)
    _, cache = model.run_with_cache(source, names_filter=name)

    def patch(z, hook):
        if whole_layer:
            z[:] = cache[name]
        else:
            z[:, :, head] = cache[name][:, :, head]
        return z

    with torch.no_grad():
        clean = logit_diff(model(batch.clean), batch)
        corrupt = logit_diff(model(batch.corrupt), batch)
        patched = logit_diff(model.run_with_hooks(base, fwd_hooks=[(name, patch)]), batch)
    norm = (patched - corrupt) / (clean - corrupt)
    if output == "patched":
        return float(norm)
    if output == "raw":
        return float(clean - patched)
    if direction == "denoising":
        return float(norm)
    return float(1 - norm) if output == "effect" else float(norm - 1)


def stub(*args, **kwargs):
    raise NotImplementedError("your code here")


def test_patch_one_head_correct(toy, capsys):
    r = nb02.check_patch_one_head(patch_one_head, toy)
    assert r.status == "correct", r.message
    assert "✓" in capsys.readouterr().out


def test_patch_one_head_not_done(toy, capsys):
    r = nb02.check_patch_one_head(stub, toy)
    assert r.status == "not done" and "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, expected", [
    (dict(output="patched"), "normalised metric of the patched run"),
    (dict(output="sign"), "wrong sign"),
    (dict(direction="denoising"), "denoising score"),
    (dict(output="raw"), "raw logit difference"),
    (dict(whole_layer=True), "every head of layer 0"),  # 0.5 is checked first; layer 0's other heads (0.2) add to it
])
def test_patch_one_head_mistakes(toy, capsys, kwargs, expected):
    r = nb02.check_patch_one_head(lambda m, b, l, h: patch_one_head(m, b, l, h, **kwargs), toy)
    out = capsys.readouterr().out
    assert r.status == "wrong" and expected in r.message, r.message
    assert "✗" in out and "Hint" in out


def test_patch_one_head_bad_return_and_crash(toy):
    r = nb02.check_patch_one_head(lambda m, b, l, h: torch.zeros(3), toy)
    assert r.status == "wrong" and "one number" in r.message
    r = nb02.check_patch_one_head(lambda m, b, l, h: b.missing, toy)
    assert r.status == "wrong" and "AttributeError" in r.message


# ---------------------------------------------------------------------------------------------
# Exercise 2


def faithfulness_of(model, batch, heads, *, bos=False, zero=False, reference="corrupt", padding=False,
                    end_only=False, inverse=False, normalised=False):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    outside = torch.ones(L, H, dtype=torch.bool)
    for l, h in heads:
        outside[l, h] = False
    if inverse:
        outside = ~outside
    pos = torch.arange(batch.clean.shape[1])
    real = (pos[None] >= (0 if bos else 1)) & (pos[None] <= batch.end[:, None])
    where = (pos[None] == batch.end[:, None]) if end_only else real
    ref = batch.corrupt if reference == "corrupt" else batch.clean
    with torch.no_grad():
        _, cache = model.run_with_cache(ref, names_filter=lambda n: n.endswith("hook_z"))
        if padding:
            means = [cache["z", l][:, 1:].mean(dim=(0, 1)) for l in range(L)]
        elif end_only:
            means = [cache["z", l][torch.arange(len(batch)), batch.end].mean(0) for l in range(L)]
        else:
            means = [cache["z", l][real].mean(0) for l in range(L)]
        if zero:
            means = [torch.zeros_like(m) for m in means]

        def run(mask):
            def ablate(z, hook):
                m = where[:, :, None, None] & mask[hook.layer()][None, None, :, None]
                return torch.where(m, means[hook.layer()], z)

            return logit_diff(model.run_with_hooks(batch.clean, fwd_hooks=[(lambda n: n.endswith("hook_z"), ablate)]),
                              batch)

        full = logit_diff(model(batch.clean), batch)
        circuit = run(outside)
        if normalised:
            empty = run(torch.ones(L, H, dtype=torch.bool))
            return float((circuit - empty) / (full - empty))
    return float(circuit / full)


def test_faithfulness_correct(toy, capsys):
    r = nb02.check_faithfulness(faithfulness_of, toy)
    assert r.status == "correct", r.message
    assert "✓" in capsys.readouterr().out


def test_faithfulness_not_done(toy, capsys):
    r = nb02.check_faithfulness(stub, toy)
    assert r.status == "not done" and "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, expected", [
    (dict(bos=True), "BOS position"),
    (dict(zero=True), "zero-ablation"),
    (dict(reference="clean"), "means over the clean prompts"),
    (dict(padding=True), "padding"),
    (dict(end_only=True), "only at END"),
    (dict(inverse=True), "outside"),
    (dict(normalised=True), "normalised value"),
])
def test_faithfulness_mistakes(toy, capsys, kwargs, expected):
    r = nb02.check_faithfulness(lambda m, b, h: faithfulness_of(m, b, h, **kwargs), toy)
    out = capsys.readouterr().out
    assert r.status == "wrong" and expected in r.message, r.message
    assert "✗" in out and "Hint" in out


def test_faithfulness_bad_return(toy):
    r = nb02.check_faithfulness(lambda m, b, h: None, toy)
    assert r.status == "wrong" and "one number" in r.message
