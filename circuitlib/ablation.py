"""Knocking heads out: zero- or mean-ablation of chosen heads' outputs (``hook_z``).

Conventions (they change numbers, so every result names them):

- ``kind="zero"`` sets the head's z (its attention-weighted values, before W_O) to 0;
  ``kind="mean"`` sets it to the head's mean z over a *reference* batch (default: the task's
  corrupted prompts), so the head still writes its average output but no prompt-specific information.
- ``at="end"`` ablates only at each prompt's END position (means taken over the reference prompts'
  END positions); ``at="all"`` ablates every position (means over all real tokens of the reference).

Hooks are added with TransformerLens's ``model.hooks`` context manager, so they are removed on every
exit path, exceptions included.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .types import Head, TaskBatch, head_name

AblationKind = Literal["zero", "mean"]
Where = Literal["end", "all"]


@torch.no_grad()
def head_means(
    model, tokens: Int[Tensor, "batch seq"], end: Int[Tensor, " batch"], *, at: Where = "end"
) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Mean z of every head over ``tokens`` at END positions (``at="end"``) or all real positions."""
    names = lambda n: n.endswith("attn.hook_z")  # noqa: E731
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=names)
    z = torch.stack([cache["z", l] for l in range(model.cfg.n_layers)])  # [layer, batch, pos, head, d]
    rows = torch.arange(tokens.shape[0])
    if at == "end":
        return z[:, rows, end].mean(dim=1)
    real = torch.arange(tokens.shape[1])[None, :] <= end[:, None]  # right padding: real tokens
    return (z * real[None, :, :, None, None]).sum(dim=(1, 2)) / real.sum()


@contextmanager
def ablate_heads(
    model,
    heads: Iterable[Head],
    *,
    kind: AblationKind = "mean",
    means: Float[Tensor, "n_layers n_heads d_head"] | None = None,
    end: Int[Tensor, " batch"] | None = None,
) -> Iterator[None]:
    """Context in which ``model``'s forward passes run with ``heads`` ablated.

    ``end`` given: ablate only at those per-prompt positions; ``None``: at every position.
    ``kind="mean"`` needs ``means`` (see :func:`head_means`).
    """
    if kind not in ("zero", "mean"):
        raise ValueError(f"unknown ablation kind {kind!r}: use 'zero' or 'mean'")
    if kind == "mean" and means is None:
        raise ValueError("mean ablation needs `means` (circuitlib.ablation.head_means on a reference batch)")
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
            raise ValueError(f"head {l}.{h} does not exist in a {model.cfg.n_layers}x{model.cfg.n_heads} model")
        by_layer.setdefault(int(l), []).append(int(h))

    def make_hook(layer: int, hs: list[int]):
        idx = torch.tensor(hs)

        def hook(z, hook):
            value = torch.zeros_like(z[0, 0, idx]) if kind == "zero" else means[layer, idx].to(z)
            if end is None:
                z[:, :, idx] = value
            else:
                rows = torch.arange(z.shape[0])
                z[rows[:, None], end.to(z.device)[:, None], idx[None, :]] = value
            return z

        return hook

    fwd = [(f"blocks.{l}.attn.hook_z", make_hook(l, hs)) for l, hs in by_layer.items()]
    with model.hooks(fwd_hooks=fwd):
        yield


@torch.no_grad()
def run_ablated(
    model,
    batch: TaskBatch,
    heads: Iterable[Head],
    *,
    kind: AblationKind = "mean",
    at: Where = "end",
    reference: Int[Tensor, "batch seq"] | None = None,
    reference_end: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch seq vocab"]:
    """Clean-prompt logits with ``heads`` ablated. Mean reference defaults to ``batch.corrupt``."""
    means = None
    if kind == "mean":
        ref = batch.corrupt if reference is None else reference
        ref_end = batch.end if reference_end is None else reference_end
        means = head_means(model, ref, ref_end, at=at)
    with ablate_heads(model, list(heads), kind=kind, means=means, end=batch.end if at == "end" else None):
        return model(batch.clean.to(model.cfg.device))


@torch.no_grad()
def ablation_curves(
    model,
    batch: TaskBatch,
    head_sets: list[list[Head]],
    *,
    kind: AblationKind = "zero",
    max_rows: int = 512,
    at: Where = "end",
) -> dict[str, list[float]]:
    """Task accuracy with each of ``head_sets`` ablated at each prompt's END position (``at="all"``:
    at every position, means over all real tokens of ``batch.corrupt``), in one go.

    The batch is repeated once per head set (in groups of at most ``max_rows`` rows) and each copy
    gets its own head mask, so many ablation sets share one forward pass. ``kind="mean"`` replaces
    z by its mean over ``batch.corrupt`` at END. Returns ``{"accuracy": [...], "top1_accuracy":
    [...], "logit_diff": [...]}``, one entry per head set (accuracy: answer logit beats wrong).
    """
    from .metrics import accuracy, logit_diff, top1_accuracy

    if kind not in ("zero", "mean"):
        raise ValueError(f"unknown ablation kind {kind!r}: use 'zero' or 'mean'")
    if at not in ("end", "all"):
        raise ValueError(f"unknown ablation position {at!r}: use 'end' or 'all'")
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, len(batch)
    masks = torch.zeros(len(head_sets), L, H, dtype=torch.bool)
    for i, heads in enumerate(head_sets):
        for l, h in heads:
            if not (0 <= l < L and 0 <= h < H):
                raise ValueError(f"head {l}.{h} does not exist in a {L}x{H} model")
            masks[i, l, h] = True
    means = head_means(model, batch.corrupt, batch.end, at=at) if kind == "mean" else None
    per_group = max(1, max_rows // n)
    out: dict[str, list[float]] = {"accuracy": [], "top1_accuracy": [], "logit_diff": []}
    for lo in range(0, len(head_sets), per_group):
        group = masks[lo : lo + per_group]
        g = group.shape[0]
        row_mask = group.repeat_interleave(n, dim=0)  # [g * n, L, H]
        end = batch.end.repeat(g).to(model.cfg.device)
        rows = torch.arange(g * n)

        def hook(z, hook):
            keep = ~row_mask[:, hook.layer()].to(z.device)[:, :, None]  # [rows, H, 1]
            value = z.new_zeros(()) if means is None else means[hook.layer()].to(z)
            if at == "all":
                return torch.where(keep[:, None], z, value)
            z[rows, end] = torch.where(keep, z[rows, end], value)
            return z

        names = [(f"blocks.{l}.attn.hook_z", hook) for l in range(L) if row_mask[:, l].any()]
        with model.hooks(fwd_hooks=names):
            resid = model(batch.clean.repeat(g, 1).to(model.cfg.device), stop_at_layer=L)
        last = model.unembed(model.ln_final(resid[rows, end][:, None]))[:, 0]  # END logits only
        for j in range(g):
            sub = last[j * n : (j + 1) * n]
            out["accuracy"].append(accuracy(sub, batch))
            out["top1_accuracy"].append(top1_accuracy(sub, batch))
            out["logit_diff"].append(float(logit_diff(sub, batch)))
    return out
