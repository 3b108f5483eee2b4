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

from .types import Head, TaskBatch

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
