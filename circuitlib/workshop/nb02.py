"""Checks for the exercises of notebook 02 (circuit discovery).

Each ``check_*`` function runs the participant's function on the embedded model, compares it with
circuitlib, and prints one line (``✓`` / ``✗`` with what is wrong and a hint / ``… not done yet``);
it never raises (see :func:`circuitlib.workshop.run_check`).

- :func:`check_patch_one_head`: activation patching of one head by hand (noising, ``hook_z`` at every
  position, normalised logit difference) against :func:`circuitlib.patching.act_patch_heads`.
- :func:`check_faithfulness`: a head set's faithfulness by hand (every other head's ``hook_z``
  mean-ablated with means over the corrupted prompts, BOS and padding excluded; ratio of mean logit
  differences) against :func:`circuitlib.circuits.faithfulness`.

Both take the model (default: the embedded model, loaded once) and build their own prompts, so the
result does not depend on what the notebook did before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from transformer_lens import HookedTransformer

from . import CheckResult, close, run_check

PATCH_TOL = 2e-3  # act_patch_heads recomputes only the positions a patch can change: float noise ~1e-5
FAITH_TOL = 2e-3  # circuitlib rounds faithfulness to 4 decimals


@lru_cache(maxsize=1)
def _toy() -> HookedTransformer:
    from ..models import load_model

    return load_model("toy")


def _model(model: HookedTransformer | None) -> HookedTransformer:
    return _toy() if model is None else model


def _batch(model: HookedTransformer, task: str, n: int, seed: int):
    from ..tasks import task_batch

    return task_batch(task, model.tokenizer, n, seed=seed)


def _num(x) -> float | None:
    """A participant's number as a float (0-d / one-element tensors too); None if it is not one."""
    try:
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                return None
            x = x.item()
        return float(x)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Exercise 1: activation patching of one head


@torch.no_grad()
def _patch_variants(model: HookedTransformer, batch, head) -> dict[str, float]:
    """What plausible mistakes would return for ``head``, to say which one was made."""
    from ..metrics import evaluate
    from ..patching import act_patch_heads, act_patch_layer_out

    stats = evaluate(model, batch)
    clean, corrupt = stats["logit_diff"], stats["corrupt_logit_diff"]
    effect = act_patch_heads(model, batch)[head]
    layer = act_patch_layer_out(model, batch, component="attn_out", per_position=False)
    return {
        "patched": 1.0 - effect,
        "sign": -effect,
        "denoising": act_patch_heads(model, batch, direction="denoising")[head],
        "raw": effect * (clean - corrupt),
        "raw_patched": clean - effect * (clean - corrupt),
        "layer": float(layer[head[0]]),
    }


def _patch_problem(name: str, got: float, want: float, variants: dict[str, float]) -> str:
    v = variants
    if close(got, v["patched"], PATCH_TOL) and not close(want, v["patched"], PATCH_TOL):
        return (f"for head {name} you returned {got:.3f}, the normalised metric of the patched run (1 = clean, "
                f"0 = corrupted); the noising score is the effect, 1 minus that: {want:.3f}.")
    if close(got, v["sign"], PATCH_TOL):
        return (f"for head {name} you returned {got:.3f}, the right size with the wrong sign: the noising score is "
                "clean - patched (positive when the head carries the clean answer).")
    if close(got, v["denoising"], PATCH_TOL):
        return (f"for head {name} you returned {got:.3f}, the denoising score (corrupted run, clean z patched in); "
                f"the exercise asks for noising: run the clean prompts and patch in the corrupted z ({want:.3f}).")
    if close(got, v["raw"], 10 * PATCH_TOL) or close(got, v["raw_patched"], 10 * PATCH_TOL):
        return (f"for head {name} you returned {got:.3f}, a raw logit difference: normalise it, "
                "(patched - corrupt) / (clean - corrupt), and return 1 minus that.")
    if close(got, v["layer"], PATCH_TOL) and not close(want, v["layer"], PATCH_TOL):
        return (f"for head {name} you returned {got:.3f}, the effect of patching every head of layer "
                f"{name.split('.')[0]}; replace only this head's slice of hook_z, z[:, :, head].")
    return (f"for head {name} you returned {got:.3f}; circuitlib's act_patch_heads gives {want:.3f} (noising, "
            "hook_z at every position, normalised logit difference, effect = 1 - patched).")


def check_patch_one_head(patch_one_head: Callable, model: HookedTransformer | None = None) -> CheckResult:
    """Check ``patch_one_head(model, batch, layer, head) -> float`` (the noising effect of one head)
    on 16 IOI prompts, for heads 0.5 and 0.2 (the two layer-0 heads that read S2 from END and push the S name
    down in notebook 02's section 4), against :func:`circuitlib.patching.act_patch_heads`."""
    from ..patching import act_patch_heads
    from ..types import head_name

    model = _model(model)
    batch = _batch(model, "ioi", 16, seed=5)
    heads = [(0, 5), (0, 2)]  # 0.5 first: patching its whole layer 0 (0.2 with it) gives a different number
    want = act_patch_heads(model, batch)

    def attempt():
        return [patch_one_head(model, batch, l, h) for l, h in heads]

    def verify(results):
        for head, got in zip(heads, results):
            value = _num(got)
            if value is None:
                return (f"for head {head_name(head)} you returned {type(got).__name__} {got!r:.60}; "
                        "return one number (a float or a one-element tensor).")
            if not close(value, want[head], PATCH_TOL):
                return _patch_problem(head_name(head), value, want[head], _patch_variants(model, batch, head))
        return None

    shown = ", ".join(f"{head_name(h)} ({want[h]:.2f})" for h in heads)
    return run_check(
        "patch_one_head", attempt, verify,
        success=f"matches circuitlib's act_patch_heads for heads {shown} on {len(batch)} IOI prompts.",
        hint="cache the corrupted run's hook_z, overwrite z[:, :, head] with it in a hook on the clean run, "
             "then return 1 - (patched - corrupt) / (clean - corrupt) of the mean logit difference.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 2: faithfulness of a head set


@torch.no_grad()
def _faith_with_padding(model: HookedTransformer, batch, heads) -> float:
    """Faithfulness with right-padding slots counted in the means (a plausible mistake)."""
    from ..metrics import logit_diff

    L, H = model.cfg.n_layers, model.cfg.n_heads
    keep = torch.zeros(L, H, dtype=torch.bool)
    for l, h in heads:
        keep[l, h] = True
    _, cache = model.run_with_cache(batch.corrupt, names_filter=lambda n: n.endswith("hook_z"))
    means = [cache["z", l][:, 1:].mean(dim=(0, 1)) for l in range(L)]  # padding in, BOS out
    pos = torch.arange(batch.clean.shape[1])
    real = (pos[None] > 0) & (pos[None] <= batch.end[:, None])

    def ablate(z, hook):
        l = hook.layer()
        where = real[:, :, None, None] & ~keep[l][None, None, :, None]
        return torch.where(where, means[l], z)

    full = logit_diff(model(batch.clean), batch)
    circ = logit_diff(model.run_with_hooks(batch.clean, fwd_hooks=[(lambda n: n.endswith("hook_z"), ablate)]), batch)
    return float(circ / full)


@torch.no_grad()
def _faith_variants(model: HookedTransformer, batch, circuit) -> dict[str, float]:
    from ..circuits import faithfulness
    from ..interventions import Ablation, run_ablations

    f = faithfulness(model, batch, circuit, n_boot=10)
    by = lambda a: faithfulness(model, batch, circuit, ablation=a, n_boot=10).faithfulness  # noqa: E731
    inverse = run_ablations(model, batch, [[], sorted(circuit.heads)]).mean_logit_diff
    return {
        "normalised": f.normalised,
        "bos": by(Ablation(bos=True)),
        "zero": by(Ablation(kind="zero")),
        "clean": by(Ablation(reference="clean")),
        "end": by(Ablation(positions="end")),
        "inverse": float(inverse[1] / inverse[0]),
        "padding": _faith_with_padding(model, batch, circuit.heads),
        "accuracy": f.accuracy_circuit,
    }


def _faith_problem(what: str, got: float, want: float, v: dict[str, float]) -> str:
    def hit(key):
        return close(got, v[key], FAITH_TOL) and not close(want, v[key], FAITH_TOL)

    if hit("inverse"):
        return (f"{what}: you returned {got:.3f}, the logit difference with the circuit's own heads ablated; "
                "faithfulness ablates every head *outside* the head set and keeps the set.")
    if hit("zero"):
        return f"{what}: you returned {got:.3f}, zero-ablation; replace z by its mean over the corrupted prompts."
    if hit("clean"):
        return (f"{what}: you returned {got:.3f}, with means over the clean prompts; take the means over "
                "batch.corrupt (the reference dataset, Wang et al.'s ABC prompts for IOI).")
    if hit("bos"):
        return (f"{what}: you returned {got:.3f}, with the BOS position in the means (and ablated); leave position "
                "0 out of both: BOS carries no prompt information.")
    if hit("padding"):
        return (f"{what}: you returned {got:.3f}, with right-padding slots counted in the means; average only over "
                "real positions, 1 <= position <= batch.end of each prompt.")
    if hit("end"):
        return f"{what}: you returned {got:.3f}, ablating only at END; ablate every real position except BOS."
    if hit("normalised"):
        return (f"{what}: you returned {got:.3f}, the normalised value (circuit - empty) / (full - empty); "
                "faithfulness here is the plain ratio circuit / full of mean logit differences.")
    if hit("accuracy"):
        return f"{what}: you returned {got:.3f}, an accuracy; return the ratio of mean logit differences."
    return (f"{what}: you returned {got:.3f}; circuitlib's faithfulness gives {want:.3f} (mean-ablation of every "
            "other head's hook_z, means over all real positions of the corrupted prompts, BOS excluded).")


def check_faithfulness(faithfulness_of: Callable, model: HookedTransformer | None = None) -> CheckResult:
    """Check ``faithfulness_of(model, batch, heads) -> float`` against
    :func:`circuitlib.circuits.faithfulness` (default convention) on 32 IOI prompts with head set
    {0.2, 0.5, 2.2} and 32 capitals prompts with {0.3, 0.4, 1.2} (each task's top 3 heads by activation
    patching in notebook 02)."""
    from ..circuits import faithfulness
    from ..types import Circuit

    model = _model(model)
    cases = [("ioi", [(0, 2), (0, 5), (2, 2)]), ("capitals", [(0, 3), (0, 4), (1, 2)])]
    batches = {task: _batch(model, task, 32, seed=5) for task, _ in cases}
    circuits = {task: Circuit(frozenset(heads), task=task, model="toy") for task, heads in cases}
    want = {task: faithfulness(model, batches[task], circuits[task], n_boot=10).faithfulness for task, _ in cases}

    def attempt():
        return [faithfulness_of(model, batches[task], list(heads)) for task, heads in cases]

    def verify(results):
        for (task, heads), got in zip(cases, results):
            what = f"{task} with head set {{{', '.join(circuits[task].names())}}}"
            value = _num(got)
            if value is None:
                return f"{what}: you returned {type(got).__name__} {got!r:.60}; return one number."
            if not close(value, want[task], FAITH_TOL):
                return _faith_problem(what, value, want[task], _faith_variants(model, batches[task], circuits[task]))
        return None

    shown = "; ".join(f"{t} {{{', '.join(circuits[t].names())}}}: {want[t]:.2f}" for t, _ in cases)
    return run_check(
        "faithfulness_of", attempt, verify,
        success=f"matches circuitlib's faithfulness ({shown}; 32 prompts each).",
        hint="one hook on every layer's hook_z: torch.where(mask, mean, z) with mask = real position "
             "(not BOS, not padding) x head outside the set; return mean logit diff (hooked) / (plain run).",
    )
