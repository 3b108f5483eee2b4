"""An ablation oracle independent of circuitlib.interventions: means from plain run_with_cache with an
explicit position mask, a hook written here that loops over prompts and positions, full-model logits
read at END."""

from __future__ import annotations

import torch


def position_mask(batch, positions: str = "all", bos: bool = False) -> torch.Tensor:
    B, S = batch.clean.shape
    pos = torch.arange(S)[None]
    if positions == "end":
        return pos == batch.end[:, None]
    return (pos <= batch.end[:, None]) & ((pos > 0) | bos)


@torch.no_grad()
def ablate(model, batch, heads, *, kind: str = "mean", positions: str = "all", bos: bool = False,
           reference: torch.Tensor | None = None):
    """Per-prompt logit difference and top-1 hit with ``heads`` ablated (mean over ``reference``,
    default the corrupted prompts, at the ablated positions)."""
    B, S = batch.clean.shape
    mask = position_mask(batch, positions, bos)
    ref = batch.corrupt if reference is None else reference
    _, cache = model.run_with_cache(ref)
    hooks = []
    for l, h in heads:
        if kind == "zero":
            value = torch.zeros(model.cfg.d_head)
        else:
            value = cache[f"blocks.{l}.attn.hook_z"][:, :, h][mask].mean(0)

        def hook(z, hook, h=h, value=value):
            z = z.clone()
            for b in range(B):
                for p in range(S):
                    if mask[b, p]:
                        z[b, p, h] = value
            return z

        hooks.append((f"blocks.{l}.attn.hook_z", hook))
    logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
    rows = torch.arange(B)
    last = logits[rows, batch.end]
    return last[rows, batch.answer] - last[rows, batch.wrong], last.argmax(-1) == batch.answer


def all_heads(model):
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
