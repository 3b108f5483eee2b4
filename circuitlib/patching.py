"""Causal circuit discovery: activation patching, attribution patching and path patching.

Conventions (they change numbers):

- **Metric.** ``metric="logit_diff"`` (default): the mean logit difference (answer - wrong) at each
  prompt's END position, *normalised* so that the clean run gives 1 and the corrupted run 0.
  ``metric="accuracy"``: fraction of prompts whose answer beats the wrong answer at END (not
  normalised). A callable ``f(end_logits [batch, vocab], batch) -> scalar`` is used as is.
- **Direction.** ``"noising"``: run the *clean* prompts and patch in activations of the
  *corrupted* run (is the component necessary?). ``"denoising"``: run the *corrupted* prompts and
  patch in *clean* activations (is it sufficient?). TransformerLens's ``transformer_lens.patching``
  functions do denoising (``corrupted_tokens`` + ``clean_cache``); for noising call them with the
  clean tokens and the corrupted cache.
- **Scores are effects**, signed so that a component carrying the clean behaviour scores > 0:
  denoising ``metric(patched) - metric(corrupted)``, noising ``metric(clean) - metric(patched)``. With
  the normalised logit difference: denoising score = TransformerLens's patched metric, noising
  score = 1 - patched metric. Each result's ``meta`` names metric, direction and baselines.
- Heads are patched through ``hook_z`` (a head's output before W_O), over all positions unless
  ``per_position=True``.

Speed (identical numbers to the one-forward-per-patch loop, see ``benchmarks/bench_patching.py``):
all patches of one layer are folded into the batch (copy ``i`` of the prompts carries patch ``i``),
the forward starts at the patched layer from the cached residual stream, and each prompt only
recomputes its positions from its first clean/corrupt difference to its END token (earlier positions
cannot change under any patch: they enter as cached keys/values; later ones are padding). Only END
logits are unembedded. ``chunk`` bounds the copies per forward (default: ~``MAX_TOKENS`` token rows).
Shortformer models (positions added to every layer's query/key inputs, not to the residual stream)
get their positional embedding passed to every block the forward starts at (TransformerLens's
``start_at_layer`` would otherwise run attention without positions). Models whose positions enter
inside attention (rotary: Llama, Pythia; ALiBi) recompute every position instead.

Screened search (:func:`act_patch_screened`): an AtP*-style screen (attribution patching on ``hook_z``
with GradDrop) ranks all heads, exact patching verifies the top candidates, and a subsampling
diagnostic decides when no unverified head is likely to reach the target set; verified values are
exact, the rest are screen estimates (its docstring says when it can miss a head).

Model families: what differs between them (where positions enter, the key/value cache, grouped-query
attention) is asked of :mod:`circuitlib.adapter`; tested on GPT-2-style, Llama-style (grouped-query
attention, rotary, RMSNorm, gated MLP), Pythia-style (parallel attention, rotary) and shortformer
attention-only models against TransformerLens's own patching (``tests/test_families.py``).
Grouped-query attention and path patching to a receiver's ``k`` / ``v``: the receiver's own keys /
values are patched, not its whole key/value group's (keys and values are computed per query head for
the call, :func:`circuitlib.adapter.kv_per_query_head`; same numbers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer

from . import adapter
from ._cores import on_free_cores
from .interventions import readout
from .metrics import check_span, logit_diff
from .results import Result
from .types import Head, HeadScores, TaskBatch, head_name

Direction = Literal["noising", "denoising"]
Metric = str | Callable[[Tensor, TaskBatch], Tensor | float]
MAX_TOKENS = 16384  # default memory bound: token rows (copies x prompts x positions) per forward


# ---------------------------------------------------------------------------------------------
# Metric and shared setup


def check_batch(model: HookedTransformer, batch: TaskBatch) -> None:
    """One clear error for inputs patching cannot use."""
    if batch.clean.shape != batch.corrupt.shape:
        raise ValueError(
            f"clean and corrupt prompts must have the same token shape to be patched position by "
            f"position; got {tuple(batch.clean.shape)} vs {tuple(batch.corrupt.shape)}. Use "
            "corruptions that keep each prompt's token count (e.g. ioi_batch(corruption='ABC'))."
        )
    if batch.clean.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"prompts have {batch.clean.shape[1]} tokens; the model's context is {model.cfg.n_ctx}")
    if len(batch) == 0:
        raise ValueError("the batch is empty: build it with n >= 1 prompts")


def _end_metric(metric: Metric) -> Callable[[Tensor, TaskBatch], Tensor]:
    """Raw (unnormalised) metric of END logits ``[batch, vocab]``."""
    if metric == "logit_diff":
        return lambda logits, batch: logit_diff(logits, batch)
    if metric == "accuracy":
        return lambda logits, batch: (logit_diff(logits, batch, per_prompt=True) > 0).float().mean()
    if callable(metric):
        return lambda logits, batch: torch.as_tensor(metric(logits, batch), dtype=torch.float32)
    raise ValueError(f"unknown metric {metric!r}: use 'logit_diff', 'accuracy' or a callable f(end_logits, batch)")


def _metric_name(metric: Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")


@dataclass
class _Setup:
    """Everything the patching loops share: both runs' activations, the metric, the packed layout.

    Packed layout: row ``b`` keeps only positions ``s_b .. END_b`` (``s_b`` = its first token where
    clean and corrupt differ), left-aligned in ``T`` slots; earlier positions cannot change under any
    patch, so they enter only as cached keys/values (``P`` slots, masked per row).
    """

    model: HookedTransformer
    batch: TaskBatch
    direction: Direction
    base: dict  # base-run (the run we patch into) activations by hook name, packed [B, T, ...]
    source: dict  # source-run activations by hook name, packed
    prefix_k: dict  # base-run keys of the first P positions by layer ([B, P, kv heads, d_head])
    prefix_v: dict  # base-run values of the first P positions by layer
    pos_embed: Tensor | None  # shortformer models: positional embedding of each packed slot [B, T, d]
    P: int  # cached prefix slots
    s_rows: Tensor  # [B] first differing position per prompt
    gather: Tensor  # [B, T] absolute position of each packed slot
    attn_mask: Tensor  # [B, P + T]
    raw: Callable
    normalised: bool
    clean_value: float
    corrupt_value: float
    metric_name: str

    @property
    def base_value(self) -> float:
        return self.clean_value if self.direction == "noising" else self.corrupt_value

    @property
    def end_rel(self) -> Tensor:
        return self.batch.end - self.s_rows

    def rel(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Packed slot of absolute ``positions`` ([..., B]) per prompt, and whether it is computed."""
        rel = positions - self.s_rows
        return rel.clamp(min=0), (rel >= 0) & (positions <= self.batch.end)

    def score(self, patched: Tensor) -> Tensor:
        """Effect of the patch on the (normalised) metric, > 0 when it carries the clean behaviour."""
        value = patched
        if self.normalised:
            value = (patched - self.corrupt_value) / (self.clean_value - self.corrupt_value)
            base = 1.0 if self.direction == "noising" else 0.0
        else:
            base = self.base_value
        return base - value if self.direction == "noising" else value - base

    def meta(self, method: str, **extra) -> dict:
        return {
            "method": method,
            "direction": self.direction,
            "metric": ("normalised_logit_diff" if self.normalised else self.metric_name),
            "clean_metric": round(self.clean_value, 6),
            "corrupt_metric": round(self.corrupt_value, 6),
            "n_prompts": len(self.batch),
            "score": "patched - corrupted" if self.direction == "denoising" else "clean - patched",
            **extra,
        }


@torch.no_grad()
def _setup(model: HookedTransformer, batch: TaskBatch, direction: Direction, metric: Metric, names: Callable[[str], bool]) -> _Setup:
    check_batch(model, batch)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"unknown direction {direction!r}: use 'noising' or 'denoising'")
    device = model.cfg.device
    clean, corrupt = batch.clean.to(device), batch.corrupt.to(device)
    if bool((batch.clean == batch.corrupt).all()):
        raise ValueError("clean and corrupt prompts are identical: there is nothing to patch")
    keep = lambda n: names(n) or adapter.restart_activation(model, n)  # noqa: E731
    L = model.cfg.n_layers
    # residual stream after the last block; logits only at END (final norm + unembedding by readout)
    clean_resid, clean_cache = model.run_with_cache(clean, names_filter=keep, stop_at_layer=L)
    corrupt_resid, corrupt_cache = model.run_with_cache(corrupt, names_filter=keep, stop_at_layer=L)
    raw = _end_metric(metric)
    clean_value = float(raw(readout(model, _end(clean_resid, batch)), batch))
    corrupt_value = float(raw(readout(model, _end(corrupt_resid, batch)), batch))
    normalised = metric == "logit_diff"
    if normalised:
        check_span(clean_value, corrupt_value)
    B, S = batch.clean.shape
    end = batch.end
    if not adapter.positions_inside_attention(model):  # absolute position vectors
        differs = batch.clean != batch.corrupt
        first = torch.where(differs.any(1), differs.float().argmax(1), end)
        s_rows = torch.minimum(first, end)  # at least END itself is recomputed
    else:  # positions live inside attention (rotary, ...): recompute every position
        s_rows = torch.zeros(B, dtype=torch.long)
    P, T = int(s_rows.max()), int((end - s_rows).max()) + 1
    gather = (s_rows[:, None] + torch.arange(T)[None]).clamp(max=S - 1)
    rows = torch.arange(B)[:, None]
    attn_mask = torch.cat([(torch.arange(P)[None] < s_rows[:, None]), torch.ones(B, T, dtype=torch.bool)], 1)
    noising = direction == "noising"
    base_cache, src_cache = (clean_cache, corrupt_cache) if noising else (corrupt_cache, clean_cache)
    packed = lambda cache: {k: v[rows, gather.to(v.device)] for k, v in cache.cache_dict.items()}  # noqa: E731
    base, source = packed(base_cache), packed(src_cache)
    pos_embed = base.pop("hook_pos_embed", None)
    source.pop("hook_pos_embed", None)
    prefix_k = {l: base_cache[f"blocks.{l}.attn.hook_k"][:, :P] for l in range(L)}
    prefix_v = {l: base_cache[f"blocks.{l}.attn.hook_v"][:, :P] for l in range(L)}
    return _Setup(
        model=model, batch=batch, direction=direction, base=base, source=source,
        prefix_k=prefix_k, prefix_v=prefix_v, P=P,
        pos_embed=pos_embed,
        s_rows=s_rows, gather=gather, attn_mask=attn_mask.long().to(device), raw=raw, normalised=normalised,
        clean_value=clean_value, corrupt_value=corrupt_value, metric_name=_metric_name(metric),
    )


def _end(logits: Tensor, batch: TaskBatch) -> Tensor:
    return logits[torch.arange(logits.shape[0]), batch.end.to(logits.device)]


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _chunk_size(chunk: int | None, setup: _Setup) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError("chunk must be a positive number of patched copies per forward pass")
        return chunk
    return max(1, MAX_TOKENS // (len(setup.batch) * setup.gather.shape[1]))


def _progress(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


@torch.no_grad()
def _run_copies(
    setup: _Setup, layer: int, n_copies: int, hooks: list, *, resid: Tensor | None = None,
    stop_at_layer: int | None = None,
) -> Tensor:
    """Run ``n_copies`` copies of the packed base prompts from block ``layer`` on, with ``hooks``.

    Returns the raw metric of each copy ``[n_copies]`` (with ``stop_at_layer``: the residual stream;
    hooks record what they need). Shortformer models get the packed slots' positional embedding
    (a forward from a later block skips the embedding step that would otherwise supply it).
    """
    model, batch, C = setup.model, setup.batch, n_copies
    B = len(batch)
    if resid is None:
        resid = setup.base[f"blocks.{layer}.hook_resid_pre"].repeat(C, 1, 1)
    cache = adapter.frozen_kv_cache(model, setup.prefix_k, setup.prefix_v, layer, C)
    pos = None if setup.pos_embed is None else setup.pos_embed.repeat(C, 1, 1)
    with model.hooks(fwd_hooks=hooks):
        out = adapter.forward_from_layer(model, resid, layer, stop_at_layer=stop_at_layer, kv_cache=cache,
                                         attention_mask=setup.attn_mask.repeat(C, 1), shortformer_pos_embed=pos)
    if stop_at_layer is not None:
        return out
    rows = torch.arange(C * B)
    logits = readout(model, out[rows, setup.end_rel.to(out.device).repeat(C)])  # [copies*B, vocab]
    return torch.stack([setup.raw(part, batch) for part in logits.split(B)])


def _scores(setup: _Setup, values: Tensor, method: str, **extra) -> HeadScores:
    model = setup.model
    return HeadScores(
        setup.score(values), method=method, target=setup.batch.task, model=model.cfg.model_name or "",
        meta=setup.meta(method, **extra),
    )


def _put(x: Tensor, setup: _Setup, C: int, positions: Tensor, values: Tensor, heads: Tensor | None = None) -> Tensor:
    """``x`` [C*B, T, (head,) ...] with copy c's absolute position ``positions[c]`` of each prompt set
    to ``values`` [B, T, (head,) ...] (head ``heads[c]`` only, if given). Returns a new tensor."""
    B = len(setup.batch)
    xc = x.reshape(C, B, *x.shape[1:]).clone()
    rel, ok = setup.rel(positions.to(setup.s_rows)[:, None].expand(C, B))
    cc, bb = ok.nonzero(as_tuple=True)
    jj = rel[cc, bb]
    if heads is None:
        xc[cc, bb, jj] = values[bb, jj]
    else:
        hh = heads[cc]
        xc[cc, bb, jj, hh] = values[bb, jj, hh]
    return xc.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Activation patching


@on_free_cores
def act_patch_heads(
    model: HookedTransformer,
    batch: TaskBatch,
    *,
    direction: Direction = "noising",
    per_position: bool = False,
    metric: Metric = "logit_diff",
    chunk: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> HeadScores | Float[Tensor, "pos n_layers n_heads"]:
    """Patch each head's output (``hook_z``) between clean and corrupted runs; one score per head.

    ``per_position=False``: the head is patched at every position -> :class:`HeadScores`
    (equals ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` for denoising).
    ``per_position=True``: one position at a time -> tensor ``[pos, n_layers, n_heads]`` (layout:
    ``scores[p]`` is a layer x head grid; TransformerLens's ``..._by_pos`` is ``[n_layers, pos, n_heads]``);
    positions before every prompt's first clean/corrupt difference score exactly 0.

    ``threads``: torch threads for the call (restored after); default torch's count capped at the cores
    other processes leave free (:mod:`circuitlib._cores`: on a busy machine, more threads than free cores
    made this batched path 2.4x slower).
    """
    setup = _setup(model, batch, direction, metric, lambda n: n.endswith("attn.hook_z"))
    L, H, S = model.cfg.n_layers, model.cfg.n_heads, batch.clean.shape[1]
    first = int(setup.s_rows.min())
    positions = list(range(first, S)) if per_position else [None]
    patches = [(h, p) for p in positions for h in range(H)]
    values = torch.full((L, len(patches)), setup.base_value)
    work = [(l, c) for l in range(L) for c in _chunks(len(patches), _chunk_size(chunk, setup))]
    for l, c in _progress(work, progress, "act_patch_heads"):
        src = setup.source[f"blocks.{l}.attn.hook_z"]
        heads = torch.tensor([patches[i][0] for i in c])
        pos = [patches[i][1] for i in c]

        def hook(z, hook, heads=heads, pos=pos, src=src):
            if pos[0] is not None:
                return _put(z, setup, len(heads), torch.tensor(pos), src, heads)
            zc = z.reshape(len(heads), len(batch), *z.shape[1:]).clone()  # [copy, batch, pos, head, d]
            zc[torch.arange(len(heads)), :, :, heads] = src[:, :, heads].permute(2, 0, 1, 3)
            return zc.reshape(z.shape)

        values[l, c.start : c.stop] = _run_copies(setup, l, len(c), [(f"blocks.{l}.attn.hook_z", hook)])
    if not per_position:
        return _scores(setup, values, "act_patch")
    out = torch.zeros(S, L, H)
    out[first:] = setup.score(values.view(L, S - first, H)).permute(1, 0, 2)
    return out


def act_patch_resid(
    model: HookedTransformer,
    batch: TaskBatch,
    *,
    direction: Direction = "noising",
    metric: Metric = "logit_diff",
    chunk: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_layers pos"]:
    """Patch the residual stream before each block (``hook_resid_pre``) at one position at a time.

    Same layout as ``transformer_lens.patching.get_act_patch_resid_pre``; positions before every
    prompt's first clean/corrupt difference score exactly 0.
    """
    setup = _setup(model, batch, direction, metric, lambda n: False)
    return _patch_positions(setup, "hook_resid_pre", chunk, progress)


def act_patch_layer_out(
    model: HookedTransformer,
    batch: TaskBatch,
    *,
    component: Literal["attn_out", "mlp_out"] = "attn_out",
    per_position: bool = True,
    direction: Direction = "noising",
    metric: Metric = "logit_diff",
    chunk: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "n_layers pos"] | Float[Tensor, " n_layers"]:
    """Patch a whole attention layer's or MLP's output, per layer and position (or all positions).

    Layout as ``transformer_lens.patching.get_act_patch_attn_out`` / ``get_act_patch_mlp_out``.
    Attention-only models (the embedded toy) have no MLPs: ``component="mlp_out"`` raises.
    """
    if component not in ("attn_out", "mlp_out"):
        raise ValueError(f"unknown component {component!r}: use 'attn_out' or 'mlp_out'")
    if component == "mlp_out" and not adapter.has_mlps(model):
        raise ValueError("this model is attention-only (no MLPs): patch component='attn_out' or the heads")
    hook_name = f"hook_{component}"
    setup = _setup(model, batch, direction, metric, lambda n: n.endswith(hook_name))
    if per_position:
        return _patch_positions(setup, hook_name, chunk, progress)
    values = torch.zeros(model.cfg.n_layers)
    for l in _progress(range(model.cfg.n_layers), progress, f"act_patch_{component}"):
        name = f"blocks.{l}.{hook_name}"
        values[l] = _run_copies(setup, l, 1, [(name, lambda act, hook, src=setup.source[name]: src.clone())])[0]
    return setup.score(values)


def _patch_positions(setup: _Setup, hook_name: str, chunk: int | None, progress: bool) -> Tensor:
    """Patch ``blocks.l.<hook_name>`` at one absolute position per copy; ``[n_layers, pos]`` scores."""
    model, batch = setup.model, setup.batch
    L, S, first = model.cfg.n_layers, batch.clean.shape[1], int(setup.s_rows.min())
    values = torch.full((L, S), setup.base_value)
    work = [(l, c) for l in range(L) for c in _chunks(S - first, _chunk_size(chunk, setup))]
    for l, c in _progress(work, progress, f"act_patch {hook_name}"):
        name = f"blocks.{l}.{hook_name}"
        pos = torch.arange(first + c.start, first + c.stop)

        def hook(act, hook, pos=pos, src=setup.source[name]):
            return _put(act, setup, len(pos), pos, src)

        if hook_name == "hook_resid_pre":  # patch the input directly, no hook needed
            out = _run_copies(setup, l, len(c), [], resid=hook(setup.base[name].repeat(len(c), 1, 1), None))
        else:
            out = _run_copies(setup, l, len(c), [(name, hook)])
        values[l, pos] = out
    scores = setup.score(values)
    scores[:, :first] = 0.0
    return scores


# ---------------------------------------------------------------------------------------------
# Attribution patching


def attribution_patch_heads(
    model: HookedTransformer,
    batch: TaskBatch,
    *,
    direction: Direction = "noising",
    per_position: bool = False,
    metric: Metric = "logit_diff",
) -> HeadScores | Float[Tensor, "pos n_layers n_heads"]:
    """Linear (first-order) estimate of :func:`act_patch_heads` from gradients (Nanda 2023).

    score ~ grad_z metric . (z_source - z_base), with the gradient taken on the base run
    (noising: clean, denoising: corrupted). Cost: one forward + backward of the base run and one
    forward of the source run, gradients w.r.t. activations only (no weight gradients): about 3
    forward-equivalents, recorded in ``meta["passes"]``. Same sign convention and layouts as
    :func:`act_patch_heads`; exact when the metric is linear in the patched activations.
    """
    check_batch(model, batch)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"unknown direction {direction!r}: use 'noising' or 'denoising'")
    if metric == "accuracy":
        raise ValueError("attribution patching needs a differentiable metric: use 'logit_diff' or a callable")
    raw = _end_metric(metric)
    device = model.cfg.device
    clean, corrupt = batch.clean.to(device), batch.corrupt.to(device)
    base_tokens, src_tokens = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    L = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(src_tokens, names_filter=lambda n: n in z_names)
    zs: list[Tensor] = []

    def start_grad(x, hook):
        return x.detach().requires_grad_(True)

    def keep(z, hook):
        zs.append(z)
        return z

    hooks = [("hook_embed", start_grad)] + [(n, keep) for n in z_names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        base_logits = model(base_tokens)
        value = raw(_end(base_logits, batch), batch)
        grads = torch.autograd.grad(value, zs)
    with torch.no_grad():
        base_value = float(value)
        src_value = float(raw(_end(src_logits, batch), batch))
        clean_value, corrupt_value = (base_value, src_value) if direction == "noising" else (src_value, base_value)
        normalised = metric == "logit_diff"
        if normalised:
            check_span(clean_value, corrupt_value)
        scale = 1.0 / (clean_value - corrupt_value) if normalised else 1.0
        sign = -1.0 if direction == "noising" else 1.0
        # [layer, batch, pos, head]: estimated change of the metric from patching each head/position.
        per = torch.stack([
            (g * (src_cache[n] - z.detach())).sum(-1) for g, z, n in zip(grads, zs, z_names)
        ])
        per = sign * scale * per.sum(dim=1)  # metric is a mean over prompts: grads already carry 1/B
    passes = {"forward": 2, "backward": 1, "forward_equivalents": 3}
    if per_position:
        return per.permute(1, 0, 2).float().cpu()
    meta = {
        "method": "attribution_patch", "direction": direction,
        "metric": "normalised_logit_diff" if normalised else _metric_name(metric),
        "clean_metric": round(clean_value, 6), "corrupt_metric": round(corrupt_value, 6),
        "n_prompts": len(batch), "passes": passes,
    }
    return HeadScores(per.sum(dim=1), method="attribution_patch", target=batch.task,
                      model=model.cfg.model_name or "", meta=meta)


# ---------------------------------------------------------------------------------------------
# Path patching


@on_free_cores
def path_patch(
    model: HookedTransformer,
    batch: TaskBatch,
    senders: Sequence[Head] | None = None,
    *,
    receivers: Sequence[Head] | None = None,
    receiver_input: Literal["q", "k", "v"] = "q",
    receiver_positions: str | None = None,
    metric: Metric = "logit_diff",
    chunk: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> HeadScores:
    """Path patching (Wang et al. 2022), noising direction: the effect of each sender's path.

    For each sender head (default: every head), run the clean prompts with that head's output
    taken from the corrupted run and every other attention head frozen to its clean output (MLPs and
    LayerNorms are recomputed).
    - ``receivers=None``: score the logits of that run -> the sender's path to the logits
      (direct effect plus paths through MLPs).
    - ``receivers`` given: record the receivers' ``receiver_input`` (``q``/``k``/``v``, i.e. the
      head's own query/key/value input) in that run, then run the clean prompts again with only
      those patched in (at ``receiver_positions``, a key of ``batch.positions`` such as ``"END"``,
      or every position) and score the logits -> the path sender -> receivers' input. Grouped-query
      attention: ``k`` / ``v`` are the receiver's own keys / values (its group's weights applied to
      its input), patched for that head only, not for the rest of its key/value group.
    Scores are ``metric(clean) - metric(patched)`` (normalised logit difference: 1 - patched);
    heads that are not senders score 0 (``meta["senders"]`` lists the senders). ``threads``: as for
    :func:`act_patch_heads` (default: capped at the free cores).
    """
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"unknown receiver_input {receiver_input!r}: use 'q', 'k' or 'v'")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    senders = all_heads if senders is None else [tuple(map(int, x)) for x in senders]
    for l, h in list(senders) + list(receivers or []):
        if not (0 <= l < L and 0 <= h < H):
            raise ValueError(f"head {l}.{h} does not exist in a {L}x{H} model")
    if receiver_positions is not None and receiver_positions not in batch.positions:
        raise ValueError(f"receiver_positions {receiver_positions!r} is not one of {sorted(batch.positions)}")
    with adapter.kv_per_query_head(model, receivers is not None and receiver_input in ("k", "v")):
        return _path_patch(model, batch, senders, receivers, receiver_input, receiver_positions, metric, chunk,
                           progress)


def _path_patch(model: HookedTransformer, batch, senders, receivers, receiver_input, receiver_positions, metric, chunk,
                progress) -> HeadScores:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    rname = f"hook_{receiver_input}"
    setup = _setup(model, batch, "noising", metric,
                   lambda n: n.endswith("attn.hook_z") or (receivers is not None and n.endswith(rname)))
    B = len(batch)
    size = _chunk_size(chunk, setup)
    values = torch.full((L, H), setup.clean_value)
    by_layer: dict[int, list[int]] = {}
    for l, h in senders:
        by_layer.setdefault(l, []).append(h)
    work = [(l, [hs[i] for i in c]) for l, hs in sorted(by_layer.items()) for c in _chunks(len(hs), size)]
    rec_layers = sorted({l for l, _ in receivers or []})
    for l, heads in _progress(work, progress, "path_patch"):
        C, idx = len(heads), torch.tensor(heads)

        def freeze(z, hook, layer):
            clean = setup.base[f"blocks.{layer}.attn.hook_z"]
            zc = clean.repeat(C, 1, 1, 1).reshape(C, B, *z.shape[1:])  # every head frozen to clean ...
            if layer == l:  # ... except the sender of each copy, taken from the corrupted run
                zc[torch.arange(C), :, :, idx] = setup.source[hook.name][:, :, idx].permute(2, 0, 1, 3)
            return zc.reshape(z.shape)

        hooks = [(f"blocks.{m}.attn.hook_z", lambda z, hook, m=m: freeze(z, hook, m)) for m in range(l, L)]
        if receivers is None:
            values[l, idx] = _run_copies(setup, l, C, hooks)
            continue
        later = [r for r in rec_layers if r > l]
        if not later:  # no receiver downstream of these senders: no path, no effect
            continue
        recorded: dict[int, Tensor] = {}

        def record(act, hook, layer):
            recorded[layer] = act.clone()
            return act

        hooks += [(f"blocks.{r}.attn.{rname}", lambda a, hook, r=r: record(a, hook, r)) for r in later]
        _run_copies(setup, l, C, hooks, stop_at_layer=max(later) + 1)

        def patch(act, hook, layer):
            rh = torch.tensor([h for r, h in receivers if r == layer])
            act = act.clone()
            if receiver_positions is None:
                act[:, :, rh] = recorded[layer][:, :, rh]
            else:  # positions before a prompt's first clean/corrupt difference never change
                rel, ok = setup.rel(batch.positions[receiver_positions])
                rows = torch.arange(act.shape[0])[ok.repeat(C)][:, None]
                pos = rel.repeat(C)[ok.repeat(C)][:, None]
                act[rows, pos, rh[None]] = recorded[layer][rows, pos, rh[None]]
            return act

        hooks2 = [(f"blocks.{r}.attn.{rname}", lambda a, hook, r=r: patch(a, hook, r)) for r in later]
        values[l, idx] = _run_copies(setup, later[0], C, hooks2)
    scores = setup.score(values)
    listed = torch.zeros(L, H, dtype=torch.bool)
    for l, h in senders:
        listed[l, h] = True
    scores[~listed] = 0.0
    target = "logits" if receivers is None else f"{receiver_input} of " + ",".join(head_name(r) for r in receivers)
    return HeadScores(scores, method="path_patch", target=batch.task, model=model.cfg.model_name or "",
                      meta=setup.meta("path_patch", path_to=target, receiver_positions=receiver_positions,
                                      senders=[head_name(h) for h in senders]))


# ---------------------------------------------------------------------------------------------
# Screened exact patching (AtP*-style screen, exact verification)


@dataclass
class ScreenedPatching(Result):
    """Result of :func:`act_patch_screened` (all grids ``[n_layers, n_heads]``, same sign convention
    and metric as :func:`act_patch_heads`).

    - ``exact``: the exact activation-patching effect of every *verified* head (identical to
      :func:`act_patch_heads` on that head), NaN where not verified.
    - ``verified``: which heads were patched exactly.
    - ``screen``: the screen's signed estimate for every head (attribution patching on ``hook_z``).
    - ``graddrop``: the GradDrop magnitude ``sum_g |estimate with layer group g's backward path
      dropped| / (G - 1)``.
    - ``rank_score``: what the screen ranks heads by: ``max(|screen|, graddrop)``.
    - ``scores``: :class:`HeadScores` holding ``exact`` where verified and ``screen`` elsewhere.
    - ``threshold``: the final target: every head with ``|exact| >= threshold`` is meant to be
      verified (``min_fraction`` x the largest verified ``|exact|``, or the ``top_k``-th largest).
    - ``bound``: the diagnostic's upper bound on ``|effect|`` over the heads left unverified
      (``max`` of their ``|subsampling estimate| + z * standard error``); ``< threshold`` when the
      search stopped because of it; NaN if every head was verified.
    - ``stopped``: ``"bound"`` (the diagnostic ruled out the rest), ``"all verified"`` or
      ``"max_verified"`` (the cap was reached first: the bound did NOT hold).
    - ``rounds``: one dict per round (heads verified so far, threshold, bound, subsets patched).
    - ``meta["passes"]``: what ran: single-head and subset patches, ``copy_layers`` (blocks run per
      prompt copy, summed; full exact patching runs ``n_heads * n_layers * (n_layers + 1) / 2``),
      GradDrop groups and strata.
    """

    exact: Float[Tensor, "n_layers n_heads"]
    verified: Bool[Tensor, "n_layers n_heads"]
    screen: Float[Tensor, "n_layers n_heads"]
    graddrop: Float[Tensor, "n_layers n_heads"]
    rank_score: Float[Tensor, "n_layers n_heads"]
    scores: HeadScores
    threshold: float
    bound: float
    stopped: str
    rounds: list
    meta: dict

    @property
    def verified_heads(self) -> list[Head]:
        return [(int(l), int(h)) for l, h in self.verified.nonzero().tolist()]

    def found(self) -> list[Head]:
        """Verified heads with ``|exact| >= threshold``, largest first."""
        heads = [x for x in self.verified_heads if abs(float(self.exact[x])) >= self.threshold]
        return sorted(heads, key=lambda x: -abs(float(self.exact[x])))


@torch.no_grad()
def _patch_masks(setup: _Setup, masks: Tensor, chunk: int | None = None) -> Tensor:
    """Exact joint patching: copy ``c`` gets every head with ``masks[c, l, h]`` taken from the source
    run (``hook_z``, all positions), all others left as in the base run. Returns the raw metric ``[C]``.

    Staggered forward: one block at a time, each copy joining at its first patched layer (its
    residual stream there is the cached base run's), so a batch of copies that start at different
    layers costs one pass over the blocks from the lowest start, not one pass per start layer."""
    C, L, H = masks.shape
    out = torch.empty(C)
    has = masks.any(-1)  # [C, L]
    first = torch.where(has.any(1), has.float().argmax(1), torch.full((C,), L))
    out[first == L] = setup.base_value  # nothing patched
    idx = (first < L).nonzero().flatten()
    idx = idx[first[idx].argsort(stable=True)]
    for c in _chunks(len(idx), _chunk_size(chunk, setup)):
        rows = idx[c.start:c.stop]
        out[rows] = _staggered(setup, masks[rows], first[rows])
    return out


@torch.no_grad()
def _staggered(setup: _Setup, masks: Tensor, start: Tensor) -> Tensor:
    """Run copies with patch masks ``masks`` [C, L, H] whose first patched layers ``start`` [C] are
    sorted ascending, block by block from ``start[0]``; copy ``c`` joins at block ``start[c]``."""
    model, batch = setup.model, setup.batch
    L, B = model.cfg.n_layers, len(batch)
    resid: Tensor | None = None
    n = 0
    for l in range(int(start[0]), L):
        joined = int((start <= l).sum())
        if joined > n:
            new = setup.base[f"blocks.{l}.hook_resid_pre"].repeat(joined - n, 1, 1)
            resid = new if resid is None else torch.cat([resid, new])
            n = joined
        sel = masks[:n, l]  # [n, H]

        def hook(z, hook, sel=sel, n=n):
            src = setup.source[hook.name]  # [B, T, H, d]
            zc = z.reshape(n, B, *z.shape[1:])
            return torch.where(sel[:, None, None, :, None].to(z.device), src[None], zc).reshape(z.shape)

        hooks = [(f"blocks.{l}.attn.hook_z", hook)] if bool(sel.any()) else []
        cache = adapter.frozen_kv_cache(model, setup.prefix_k, setup.prefix_v, l, n, stop_at_layer=l + 1)
        pos = None if setup.pos_embed is None else setup.pos_embed.repeat(n, 1, 1)
        with model.hooks(fwd_hooks=hooks):
            resid = adapter.forward_from_layer(model, resid, l, stop_at_layer=l + 1, kv_cache=cache,
                                               attention_mask=setup.attn_mask.repeat(n, 1),
                                               shortformer_pos_embed=pos)
    assert resid is not None and n == len(start)
    rows = torch.arange(n * B)
    logits = readout(model, resid[rows, setup.end_rel.to(resid.device).repeat(n)])
    return torch.stack([setup.raw(part, batch) for part in logits.split(B)])


def _screen_estimates(setup: _Setup, groups: int) -> tuple[Tensor, Tensor]:
    """Attribution patching on the packed base run (positions from each prompt's first difference;
    earlier positions are cached keys/values, as in exact patching) and GradDrop over ``groups``
    consecutive layer groups. Returns signed estimates of the *effect* ``[L, H]`` and the GradDrop
    magnitudes ``[L, H]`` (both in the effect's units)."""
    model, batch = setup.model, setup.batch
    L, B = model.cfg.n_layers, len(batch)
    cache = adapter.frozen_kv_cache(model, setup.prefix_k, setup.prefix_v, 0, 1)
    zs: list[Tensor] = []

    def keep(z, hook):
        zs.append(z)
        return z

    resid = [setup.base["blocks.0.hook_resid_pre"].detach().clone().requires_grad_(True)]
    with torch.enable_grad(), model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", keep) for l in range(L)]):
        for l in range(L):
            resid.append(adapter.forward_from_layer(
                model, resid[l], l, stop_at_layer=l + 1, kv_cache=cache, attention_mask=setup.attn_mask,
                shortformer_pos_embed=setup.pos_embed))
        rows = torch.arange(B)
        end_resid = resid[L][rows, setup.end_rel.to(resid[L].device)]
        value = setup.raw(readout(model, end_resid), batch)
        bounds = sorted({round(i * L / groups) for i in range(groups + 1)})
        ends = [b for b in bounds[1:]]
        grads = torch.autograd.grad(value, zs + [resid[b] for b in ends], retain_graph=True)
        g_z, g_r = grads[:L], dict(zip(ends, grads[L:]))
        delta = [setup.source[f"blocks.{l}.attn.hook_z"] - zs[l].detach() for l in range(L)]
        dot = lambda g, l: (g * delta[l]).sum((0, 1, 3))  # noqa: E731  [H] change of the raw metric
        atp = torch.stack([dot(g_z[l], l) for l in range(L)])  # [L, H]
        G = len(bounds) - 1
        drop_sum = torch.zeros_like(atp)
        for a, b in zip(bounds[:-1], bounds[1:]):
            est = atp.clone()
            est[a:b] = 0.0  # the group's own heads: their only path is dropped
            if a > 0:  # heads below the group: gradient that skips the group (seeded at its input)
                g_low = torch.autograd.grad(resid[a], zs[:a], grad_outputs=g_r[b], retain_graph=True)
                est[:a] = torch.stack([dot(g_low[l], l) for l in range(a)])
            drop_sum += est.abs()
    effect = lambda delta_raw: setup.score(setup.base_value + delta_raw)  # noqa: E731
    scale = abs(float(effect(torch.tensor(1.0))))  # |d effect / d raw metric|
    graddrop = drop_sum / max(G - 1, 1) * scale
    return effect(atp.detach()).float().cpu(), graddrop.detach().float().cpu()


@on_free_cores
def act_patch_screened(
    model: HookedTransformer,
    batch: TaskBatch,
    *,
    direction: Direction = "noising",
    metric: Metric = "logit_diff",
    min_fraction: float | None = 0.05,
    top_k: int | None = None,
    graddrop_groups: int | None = None,
    initial: int | None = None,
    step: int | None = None,
    diagnostic_samples: int = 8,
    strata: int | None = None,
    max_subsets: int | None = None,
    z: float = 2.0,
    max_verified: int | None = None,
    seed: int = 0,
    chunk: int | None = None,
    threads: int | None = None,
) -> ScreenedPatching:
    """Exact per-head activation patching on the heads that matter, found by an AtP*-style screen.

    Conventions: the same metric, direction, sign and positions as :func:`act_patch_heads` (heads
    patched through ``hook_z`` at every position; effect > 0 when the head carries the clean
    behaviour). **Verified** means patched exactly: a verified head's value in ``exact`` equals
    :func:`act_patch_heads` for that head (one head per forward copy, the same blocks on the same
    cached inputs; equal up to float rounding, ~1e-6).

    1. **Screen** (2 forwards for the caches, logits at END only, one forward + backward on the positions from
       each prompt's first clean/corrupt difference, and ``graddrop_groups`` partial backwards):
       attribution patching on ``hook_z``: ``grad_z metric . (z_source - z_base)`` summed over
       positions. The change of each head's own output is exact (both runs are computed), so the
       *QK fix* of AtP* (Kramar et al. 2024, recomputing the softmax for the head's own query/key
       change) is built in at this node granularity: only what happens *downstream* of the head is
       linearised. **GradDrop** against cancellation of direct and indirect paths: the estimate is
       recomputed with the backward pass through each group of consecutive layers dropped (its
       residual contributions pass no gradient), and ``sum_g |estimate_g| / (G - 1)`` is kept
       (the paper drops one layer at a time, ``G = n_layers``; default here
       ``min(n_layers, 6)`` groups to bound the cost on deep models). Heads are ranked by
       ``max(|estimate|, GradDrop)``.
    2. **Verification**: the ``initial`` best-ranked heads are patched exactly, then ``step`` more
       at a time while an unverified head that the diagnostic (3) cannot yet bound (no usable
       subsets in its stratum) has a rank score reaching the threshold (``min_fraction`` x
       the largest verified ``|exact|``; ``top_k``: the ``top_k``-th largest verified ``|exact|``;
       both given: the smaller, i.e. both sets are searched for).
    3. **Diagnostic bound** (the subsampling diagnostic of AtP*'s section on false negatives, as
       implemented here), **layer-stratified**: the layers are cut into ``strata`` consecutive groups
       (default ``min(n_layers, 6)``); within each, random halves of its unverified heads and their
       complements are patched jointly and exactly (``diagnostic_samples`` subsets at a time,
       balanced: every head is in half of them). A subset's forward starts at its lowest layer
       (earlier layers come from the cache), and its residual variance holds only its stratum's
       heads. Assuming effects add within a subset, the residual of each subset (its exact effect
       minus the known values of its heads: exact where verified, screen estimate elsewhere)
       estimates each unverified head's screen error by the difference of the mean residual with
       and without it; ``|estimate + error| + z * standard error`` bounds its effect. A head whose
       point value ``|estimate + error|`` reaches the threshold is verified. A head that reaches it
       only through the ``z * standard error`` term gets more subsets in its stratum (as many as the
       standard error's ``1 / sqrt(subsets)`` shrinkage says it needs), unless patching the flagged
       heads exactly costs fewer layer-forwards or the stratum would exceed ``max_subsets`` (default
       ``8 * diagnostic_samples``): then they are verified. The search stops when no bound reaches
       the threshold (``stopped = "bound"``) or everything is verified. Subsets from earlier rounds
       are reused; each round's single-head patches and subsets run as one batch in which every copy
       joins the forward at its first patched layer.

    When it can miss a head: when effects do not add within the random subsets (two unverified
    heads that cancel each other in every subset holding both), or by chance: at the threshold, a
    head's bound falls below it with probability about ``Phi(-z)`` (2.3% for ``z = 2``, normal
    approximation with few subsets). ``max_verified`` caps the exact patches; if the cap stops the
    search, ``stopped == "max_verified"`` and the bound did not hold. Verified values never miss:
    they are exact. ``threads``: as for :func:`act_patch_heads` (default: capped at the free cores).
    """
    if min_fraction is None and top_k is None:
        raise ValueError("give min_fraction (e.g. 0.05) or top_k (or both): what the search must find")
    if min_fraction is not None and not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1]; got {min_fraction}")
    if metric == "accuracy":
        raise ValueError("the screen needs a differentiable metric: use 'logit_diff' or a callable "
                         "(or act_patch_heads for metric='accuracy')")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of heads; got {top_k}")
    if diagnostic_samples < 2 or diagnostic_samples % 2:
        raise ValueError(f"diagnostic_samples must be an even number >= 2 (subsets come with their "
                         f"complements); got {diagnostic_samples}")
    t0 = time.perf_counter()
    setup = _setup(model, batch, direction, metric, lambda n: n.endswith("attn.hook_z"))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    N = L * H
    groups = min(L, 6) if graddrop_groups is None else int(graddrop_groups)
    if not 1 <= groups <= L:
        raise ValueError(f"graddrop_groups must be between 1 and n_layers = {L}; got {graddrop_groups}")
    screen, graddrop = _screen_estimates(setup, groups)
    t_screen = time.perf_counter() - t0
    rank = torch.maximum(screen.abs(), graddrop)
    order = rank.flatten().argsort(descending=True).tolist()
    flat_screen = screen.flatten()
    exact = torch.full((N,), float("nan"))
    done = torch.zeros(N, dtype=torch.bool)
    initial = max(top_k or 0, 8) if initial is None else initial
    step = max(4, N // 24) if step is None else step
    cap = N if max_verified is None else max_verified
    gen = torch.Generator().manual_seed(seed)
    n_strata = min(L, 6) if strata is None else int(strata)
    if not 1 <= n_strata <= L:
        raise ValueError(f"strata must be between 1 and n_layers = {L}; got {strata}")
    sub_cap = 8 * diagnostic_samples if max_subsets is None else int(max_subsets)
    cuts = sorted({round(i * L / n_strata) for i in range(n_strata + 1)})
    layer_of = torch.arange(N) // H
    stratum_of = torch.bucketize(layer_of, torch.tensor(cuts[1:-1]), right=True)  # [N] layer group
    subsets: list[Tensor] = []  # [N] bool masks, each within one stratum
    sub_stratum: list[int] = []
    sub_values: list[float] = []
    rounds: list[dict] = []
    n_patched = {"single": 0, "subsets": 0, "copy_layers": 0}

    def run(idx: list[int], new: list[tuple[Tensor, int]]) -> None:
        """One staggered batch: exact single-head patches of ``idx`` and the new subsets."""
        idx = [i for i in dict.fromkeys(idx) if not done[i]][: max(0, cap - int(done.sum()))]
        masks = torch.zeros(len(idx) + len(new), N, dtype=torch.bool)
        if idx:
            masks[torch.arange(len(idx)), torch.tensor(idx)] = True
        for j, (mask, _) in enumerate(new):
            masks[len(idx) + j] = mask
        if len(masks) == 0:
            return
        vals = setup.score(_patch_masks(setup, masks.view(-1, L, H), chunk))
        starts = torch.where(masks.any(1), (masks.float().argmax(1) // H), torch.full((len(masks),), L))
        n_patched["copy_layers"] += int((L - starts).sum())
        if idx:
            exact[idx] = vals[: len(idx)]
            done[idx] = True
            n_patched["single"] += len(idx)
        for j, (mask, g) in enumerate(new):
            subsets.append(mask)
            sub_stratum.append(g)
            sub_values.append(float(vals[len(idx) + j]))
        n_patched["subsets"] += len(new)

    def threshold() -> float:
        vals = exact[done].abs().sort(descending=True).values
        theta = float("inf") if min_fraction is None else min_fraction * float(vals[0])
        if top_k is not None:  # fewer than k verified: every head may still enter the top k
            theta = min(theta, float(vals[top_k - 1]) if len(vals) >= top_k else 0.0)
        return theta

    def halves(heads: Tensor, g: int, count: int) -> list[tuple[Tensor, int]]:
        """``count`` (even) subsets of ``heads``: random halves and their complements."""
        out = []
        for _ in range(count // 2):
            pick = torch.rand(len(heads), generator=gen) < 0.5
            for part in (heads[pick], heads[~pick]):
                mask = torch.zeros(N, dtype=torch.bool)
                mask[part] = True
                out.append((mask, g))
        return out

    def diagnose(theta: float) -> tuple[Tensor, Tensor, Tensor]:
        """Unverified heads, ``|screen + subsampling estimate of its error|`` and its standard error
        (inf where the head's stratum has no usable subsets yet). Subsets holding a verified head
        with ``|exact| >= theta`` are left out: next to a large effect, effects add worst (a head
        can only move a metric that the large one has not already moved)."""
        left = (~done).nonzero().flatten()
        pt = flat_screen[left].abs().clone()
        se = torch.full((len(left),), float("inf"))
        if not subsets:
            return left, pt, se
        S = torch.stack(subsets)
        large = done & (exact.abs() >= theta)
        gs = torch.tensor(sub_stratum).masked_fill((S & large).any(1), -1)
        known = torch.where(done, exact, flat_screen).nan_to_num(0.0)
        resid = torch.tensor(sub_values) - (S.float() * known).sum(1)
        for g in stratum_of[left].unique().tolist():
            rows, cols = gs == g, (stratum_of[left] == g).nonzero().flatten()
            if int(rows.sum()) < 2:
                continue
            inside = S[rows][:, left[cols]].float()  # [m_g, heads]
            r = resid[rows]
            n_in, n_out = inside.sum(0), (1 - inside).sum(0)
            mean_in = (inside * r[:, None]).sum(0) / n_in.clamp(min=1)
            mean_out = ((1 - inside) * r[:, None]).sum(0) / n_out.clamp(min=1)
            err = torch.sqrt(float(r.var()) * (1 / n_in.clamp(min=1) + 1 / n_out.clamp(min=1)))
            err[(n_in == 0) | (n_out == 0)] = float("inf")
            pt[cols] = (flat_screen[left[cols]] + mean_in - mean_out).abs()
            se[cols] = err
        return left, pt, se

    # round 0: the screen's best heads and a first set of subsets in every stratum, one batch
    first_new = []
    rest = torch.ones(N, dtype=torch.bool)
    rest[order[:initial]] = False
    for g in range(len(cuts) - 1):
        heads = (rest & (stratum_of == g)).nonzero().flatten()
        if len(heads) >= 2:
            first_new += halves(heads, g, diagnostic_samples)
    run(order[:initial], first_new)
    bound, stopped = float("nan"), "all verified"
    rank_flat = rank.flatten()
    while True:
        if bool(done.all()):
            bound, stopped = float("nan"), "all verified"
            break
        if int(done.sum()) >= cap:
            stopped = "max_verified"
            break
        theta = threshold()
        left, pt, se = diagnose(theta)
        # the screen's rank decides only where the diagnostic has nothing to say yet (no usable subsets
        # in the head's stratum); elsewhere the diagnostic's exact-based bound decides
        no_diag = torch.zeros(N, dtype=torch.bool)
        no_diag[left[~torch.isfinite(se)]] = True
        pending = [i for i in order if not done[i] and no_diag[i] and rank_flat[i] >= theta][:step]
        ucb = pt + z * se
        bound = float(ucb.max())
        by_point = left[pt >= theta]
        by_point = by_point[pt[pt >= theta].argsort(descending=True)][:step].tolist()
        to_verify = pending + [i for i in by_point if i not in pending]
        se_only = (pt < theta) & (ucb >= theta)
        new: list[tuple[Tensor, int]] = []
        for g in stratum_of[left[se_only]].unique().tolist():
            free = [i for i in left[stratum_of[left] == g].tolist() if i not in to_verify]
            mine = se_only & (stratum_of[left] == g)
            heads_g = left[mine]
            large = done & (exact.abs() >= theta)
            m_g = sum(1 for x, mask in zip(sub_stratum, subsets) if x == g and not bool((mask & large).any()))
            ratio = (z * se[mine] / (theta - pt[mine])).max()
            need = diagnostic_samples if not torch.isfinite(ratio) else int(torch.ceil(m_g * ratio ** 2)) - m_g
            need = max(diagnostic_samples, need + need % 2)
            low = int(layer_of[torch.tensor(free)].min()) if free else L
            cost_subsets = need * (L - low)
            cost_verify = int((L - layer_of[heads_g]).sum())
            if len(free) >= 2 and m_g + need <= sub_cap and cost_subsets < cost_verify:
                new += halves(torch.tensor(free), g, min(need, 4 * diagnostic_samples))
            else:  # more subsets cannot pay off here: patch these heads exactly
                order_g = heads_g[ucb[mine].argsort(descending=True)].tolist()
                to_verify += [i for i in order_g if i not in to_verify]
        rounds.append({"verified": int(done.sum()), "threshold": theta, "bound": bound,
                       "reason": "screen" if pending and not (by_point or se_only.any()) else "diagnostic",
                       "subsets": len(subsets), "flagged": len(by_point) + int(se_only.sum()),
                       "flagged_by_se": int(se_only.sum()), "new_subsets": len(new), "to_verify": len(to_verify)})
        if not to_verify and not new:
            stopped = "bound"
            break
        run(to_verify, new)
    theta = threshold()
    exact_grid = exact.view(L, H)
    verified = done.view(L, H)
    combined = torch.where(verified, exact_grid, screen)
    passes = {"single_head_patches": n_patched["single"], "subset_patches": n_patched["subsets"],
              "copy_layers": n_patched["copy_layers"], "graddrop_groups": groups, "strata": len(cuts) - 1}
    meta = setup.meta("act_patch_screened", threshold=theta, min_fraction=min_fraction, top_k=top_k,
                      verified=int(done.sum()), stopped=stopped, bound=bound, z=z, passes=passes,
                      screen_seconds=round(t_screen, 3), seconds=round(time.perf_counter() - t0, 3))
    scores = HeadScores(combined, method="act_patch_screened", target=batch.task,
                        model=model.cfg.model_name or "", meta=meta)
    return ScreenedPatching(exact=exact_grid, verified=verified, screen=screen, graddrop=graddrop,
                            rank_score=rank, scores=scores, threshold=theta, bound=bound, stopped=stopped,
                            rounds=rounds, meta=meta)


def timed(fn: Callable, *args, **kwargs):
    """``(result, seconds)`` of one call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0

