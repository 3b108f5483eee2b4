"""The one place that changes attention heads during a forward pass, and reads the result out.

Everything that knocks heads out — a circuit's faithfulness, top-k vs random heads, cross-task
ablation, MAPS's causal check — describes the knock-out with an :class:`Ablation` and runs it with
:func:`run_ablations`, which evaluates many head sets in one batched forward pass.

Conventions (they change numbers; :meth:`Ablation.describe` states them in every result):

- **What is replaced**: a head's ``hook_z`` (its attention-weighted values, before ``W_O``).
- ``kind="zero"``: replaced by 0 (MAPS's causal check).
  ``kind="mean"``, ``means="pooled"``: by the head's mean z over all real token positions of the
  *reference* prompts (right padding excluded; the BOS position excluded unless ``bos=True``).
  ``kind="mean"``, ``means="template"``: by the mean over reference prompts *of the same template*,
  position by position (Wang et al.'s convention for IOI; needs ``TaskBatch.template``).
  ``kind="resample"``: by the z of another reference prompt of the same template (a seeded
  derangement inside each template group; a prompt alone in its group takes its own reference
  prompt, i.e. its corrupted version when the reference is the corrupted prompts).
- **Reference data**: ``reference="corrupt"`` (default: the batch's corrupted prompts, e.g. IOI's
  ABC dataset) or ``"clean"``; or pass a whole :class:`TaskBatch` as ``reference=`` to
  :func:`run_ablations` (its clean prompts; for ``"template"`` / ``"resample"`` it must be aligned
  with the batch prompt by prompt).
- **Positions**: ``positions="all"`` ablates every real position (BOS only with ``bos=True``; BOS
  carries no prompt information, its z is the same in every prompt); ``"end"`` only each prompt's
  END position (pooled means then come from the reference's END positions).
- **Readout** (:func:`readout`): at each prompt's END position only — final LayerNorm when the model
  has one, unembedding with its bias, logit soft-cap when configured.

Random head sets for controls come from :func:`sample_head_sets` (one sampler for the library), by
default from :func:`live_heads` and, where the heads under test are given, matched by layer.

Hooks are added with TransformerLens's ``model.hooks`` context manager: removed on every exit path,
exceptions included.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from transformer_lens import HookedTransformer
from .results import Result
from .types import Head, TaskBatch, head_name


AblationKind = Literal["zero", "mean", "resample"]
MAX_TOKENS = 32768  # token rows (copies x prompts x positions) per forward pass
MAX_LOGITS = 2**26  # END logits (rows x vocabulary) per forward pass: 256 MiB in float32


# ---------------------------------------------------------------------------------------------
# The readout


def readout(model: HookedTransformer, resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_vocab"]:
    """Logits from final residual vectors: the final LayerNorm when the model has one, the
    unembedding (with its bias), and the logit soft-cap when the config sets one (Gemma 2 style).
    Accepts any leading shape."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    lead = resid.shape[:-1]
    x = resid.reshape(-1, 1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)[:, 0]
    return logits.reshape(*lead, logits.shape[-1])


# ---------------------------------------------------------------------------------------------
# The specification


@dataclass(frozen=True)
class Ablation:
    """How heads are knocked out (see the module docstring for each field's meaning)."""

    kind: AblationKind = "mean"
    positions: Literal["all", "end"] = "all"
    reference: Literal["corrupt", "clean"] = "corrupt"
    means: Literal["pooled", "template"] = "pooled"
    bos: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"kind": ("zero", "mean", "resample"), "positions": ("all", "end"),
                  "reference": ("corrupt", "clean"), "means": ("pooled", "template")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Ablation({name}={getattr(self, name)!r}) is not known: use one of {allowed}")
        if self.positions == "end" and (self.means == "template" or self.kind == "resample"):
            raise ValueError("positions='end' goes with kind='zero' or pooled means; template means and "
                             "resampling are per position: use positions='all'")

    def describe(self) -> str:
        """One line naming every convention that changes the numbers."""
        where = "every position" if self.positions == "all" else "END only"
        bos = "BOS included" if self.bos else "BOS excluded"
        if self.kind == "zero":
            return f"zero-ablation of hook_z at {where} ({bos})"
        ref = f"the {self.reference} prompts"
        if self.kind == "resample":
            return f"resample-ablation of hook_z at {where}: z of another of {ref} with the same template (seed {self.seed}; {bos})"
        over = ("per template and position" if self.means == "template"
                else "over END positions" if self.positions == "end" else "over all real positions")
        return f"mean-ablation of hook_z at {where}: means {over} of {ref} ({bos})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "positions": self.positions, "reference": self.reference,
                "means": self.means, "bos": self.bos, "seed": self.seed, "description": self.describe()}


#: The ablation conventions a circuit is checked under (``circuits.faithfulness_by_convention``).
CONVENTIONS: dict[str, Ablation] = {
    "mean": Ablation(),
    "mean (BOS in means)": Ablation(bos=True),
    "template mean": Ablation(means="template"),
    "resample": Ablation(kind="resample"),
    "zero": Ablation(kind="zero"),
}


# ---------------------------------------------------------------------------------------------
# Replacement values


def _z_cache(model: HookedTransformer, tokens: Tensor) -> Float[Tensor, "n_layers batch seq n_heads d_head"]:
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n.endswith("attn.hook_z"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(model.cfg.n_layers)])


def _groups(batch: TaskBatch) -> list[list[int]]:
    if getattr(batch, "template", None) is None:
        raise ValueError(f"the {batch.task} batch has no per-prompt template ids (TaskBatch.template): template "
                         "means and resampling need them; build it with circuitlib.tasks.task_batch")
    by: dict[str, list[int]] = {}
    for i, t in enumerate(batch.template):
        by.setdefault(t, []).append(i)
    return list(by.values())


def position_mask(batch: TaskBatch, ablation: Ablation) -> Bool[Tensor, "batch seq"]:
    """Which (prompt, position) slots are ablated: END only, or every real position (BOS per ``bos``)."""
    B, S = batch.clean.shape
    pos = torch.arange(S)[None, :]
    end = batch.end[:, None]
    if ablation.positions == "end":
        return pos == end
    has_bos = batch.meta.get("bos", True)  # TaskBatch convention: rows start with BOS unless meta says not
    return (pos <= end) & ((pos > 0) | ablation.bos | (not has_bos))


@torch.no_grad()
def replacement(
    model: HookedTransformer, batch: TaskBatch, ablation: Ablation, reference: TaskBatch | None = None
) -> Float[Tensor, "n_layers batch_or_1 seq_or_1 n_heads d_head"]:
    """The z that replaces an ablated head's z, per layer, broadcastable to ``[L, batch, seq, H, d]``.

    ``reference``: a TaskBatch whose clean prompts give the means (default: ``batch.corrupt`` or
    ``batch.clean`` as ``ablation.reference`` says).
    """
    L, H, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    if ablation.kind == "zero":
        return torch.zeros(L, 1, 1, H, d)
    if reference is None:
        ref_tokens = batch.corrupt if ablation.reference == "corrupt" else batch.clean
        ref = batch
    else:
        ref_tokens, ref = reference.clean, reference
    z = _z_cache(model, ref_tokens)  # [L, R, S, H, d]
    if ablation.kind == "mean" and ablation.means == "pooled":
        mask = position_mask(ref, ablation).to(z.dtype)  # [R, S]
        total = (z * mask[None, :, :, None, None]).sum(dim=(1, 2))
        return (total / mask.sum())[:, None, None]
    if reference is not None and (getattr(reference, "template", None) != getattr(batch, "template", None) or reference.clean.shape != batch.clean.shape):
        raise ValueError("template means and resampling need a reference aligned with the batch (same templates "
                         "and token shape, prompt by prompt); pass reference=None to use the batch's own prompts")
    out = torch.empty_like(z)
    rng = np.random.default_rng(ablation.seed)
    for rows in _groups(batch):
        idx = torch.tensor(rows)
        if ablation.kind == "mean":
            out[:, idx] = z[:, idx].mean(dim=1, keepdim=True)
        else:
            perm = _derangement(len(rows), rng)
            out[:, idx] = z[:, idx[perm]]
    return out


def _derangement(n: int, rng: np.random.Generator) -> Tensor:
    """A random permutation of ``range(n)`` with no fixed point (identity for n = 1)."""
    if n == 1:
        return torch.tensor([0])
    while True:
        p = rng.permutation(n)
        if (p != np.arange(n)).all():
            return torch.as_tensor(p)


# ---------------------------------------------------------------------------------------------
# Running many head sets at once


@dataclass
class AblationRun(Result):
    """What :func:`run_ablations` measured, per head set and prompt, at END.

    ``logit_diff[i, b]``: logit(answer) - logit(wrong) of prompt ``b`` with head set ``i`` ablated;
    ``top1[i, b]``: whether the answer is the vocabulary argmax. Means over prompts:
    :attr:`mean_logit_diff`, :attr:`accuracy` (two-way: answer beats wrong; chance 0.5) and
    :attr:`top1_accuracy`.
    """

    logit_diff: Float[Tensor, "n_sets batch"]
    top1: Bool[Tensor, "n_sets batch"]
    ablation: dict
    n_prompts: int

    @property
    def mean_logit_diff(self) -> Float[Tensor, " n_sets"]:
        return self.logit_diff.mean(1)

    @property
    def accuracy(self) -> Float[Tensor, " n_sets"]:
        return (self.logit_diff > 0).float().mean(1)

    @property
    def top1_accuracy(self) -> Float[Tensor, " n_sets"]:
        return self.top1.float().mean(1)


def head_masks(model: HookedTransformer, head_sets: Sequence[Iterable[Head]]) -> Bool[Tensor, "n_sets n_layers n_heads"]:
    """``masks[i, l, h]`` is True where head ``(l, h)`` is in ``head_sets[i]``; unknown heads are an error."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    masks = torch.zeros(len(head_sets), L, H, dtype=torch.bool)
    for i, heads in enumerate(head_sets):
        for l, h in heads:
            if not (0 <= l < L and 0 <= h < H):
                raise ValueError(f"head {l}.{h} does not exist in a {L}x{H} model (layers 0..{L - 1}, heads 0..{H - 1})")
            masks[i, l, h] = True
    return masks


_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("circuitlib_ablation_progress", default=False)


@contextlib.contextmanager
def show_progress(enabled: bool = True):
    """Inside the block, :func:`run_ablations` shows a tqdm bar over its chunks (with an ETA) when it
    runs more than one; off by default (the report turns it on with its own bars)."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@torch.no_grad()
def run_ablations(
    model: HookedTransformer,
    batch: TaskBatch,
    masks: Bool[Tensor, "n_sets n_layers n_heads"] | Sequence[Iterable[Head]],
    ablation: Ablation = Ablation(),
    *,
    reference: TaskBatch | None = None,
) -> AblationRun:
    """Run ``batch``'s clean prompts once per head set, each with its heads ablated, read out at END.

    ``masks``: a boolean ``[n_sets, n_layers, n_heads]`` tensor (True = ablate) or a list of head sets.
    Copy ``i`` of the prompts carries head set ``i``; copies go through the model in chunks of at most
    :data:`MAX_TOKENS` token rows and :data:`MAX_LOGITS` END logits. See the module docstring for the
    conventions; ``reference`` overrides the reference prompts (a TaskBatch, its clean prompts).
    """
    if not isinstance(masks, Tensor):
        masks = head_masks(model, list(masks))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if masks.dtype != torch.bool or masks.ndim != 3 or tuple(masks.shape[1:]) != (L, H):
        raise ValueError(f"masks must be a bool tensor [n_sets, {L}, {H}]; got {masks.dtype} {tuple(masks.shape)}")
    B, S = batch.clean.shape
    device = model.cfg.device
    value = replacement(model, batch, ablation, reference).to(device)  # [L, B|1, S|1, H, d]
    where = position_mask(batch, ablation).to(device)  # [B, S]
    per_chunk = max(1, min(MAX_TOKENS // (B * S), MAX_LOGITS // (B * model.cfg.d_vocab)))
    diffs, top1s = [], []
    end = batch.end.to(device)
    answer, wrong = batch.answer.to(device), batch.wrong.to(device)
    starts = range(0, masks.shape[0], per_chunk)
    if _PROGRESS.get() and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="    ablation runs", unit=" chunk", leave=False, dynamic_ncols=True)
    for lo in starts:
        part = masks[lo : lo + per_chunk].to(device)
        C = part.shape[0]

        def hook(z, hook, part=part, C=C):
            layer = hook.layer()
            zc = z.view(C, B, *z.shape[1:])  # [copy, batch, pos, head, d]
            cond = part[:, layer][:, None, None, :, None] & where[None, :, :, None, None]
            return torch.where(cond, value[layer][None].to(z.dtype), zc).view(z.shape)

        fwd = [(f"blocks.{l}.attn.hook_z", hook) for l in range(L) if bool(part[:, l].any())]
        with model.hooks(fwd_hooks=fwd):
            resid = model(batch.clean.to(device).repeat(C, 1), stop_at_layer=L)
        rows = torch.arange(C * B, device=device)
        logits = readout(model, resid[rows, end.repeat(C)])  # [C*B, vocab]
        d = logits[rows, answer.repeat(C)] - logits[rows, wrong.repeat(C)]
        diffs.append(d.view(C, B).cpu())
        top1s.append((logits.argmax(-1) == answer.repeat(C)).view(C, B).cpu())
    return AblationRun(logit_diff=torch.cat(diffs), top1=torch.cat(top1s), ablation=ablation.to_dict(), n_prompts=B)


# ---------------------------------------------------------------------------------------------
# Random head sets


def live_heads(model: HookedTransformer, *, threshold: float = 1e-3) -> list[Head]:
    """Heads that can carry signal: OV weight norm ``||W_V W_O||_F`` at least ``threshold`` times the
    largest head's. On the embedded model the head group-lasso switches heads off (their norm is
    ~1e-12); on a pretrained model every head passes."""
    # ||W_V W_O||_F^2 = sum((W_V^T W_V) * (W_O W_O^T)): d_head x d_head per head, never the
    # [layers, heads, d_model, d_model] product (1.6 GB on gpt2-medium).
    with torch.no_grad():
        vv = torch.einsum("lhde,lhdf->lhef", model.W_V, model.W_V)
        oo = torch.einsum("lhem,lhfm->lhef", model.W_O, model.W_O)
        ov = (vv * oo).sum(dim=(-2, -1)).clamp_min(0).sqrt()
    keep = ov >= threshold * ov.max()
    return [(int(l), int(h)) for l, h in keep.nonzero()]


@dataclass
class HeadSetDraws(Result):
    """Random head sets from :func:`sample_head_sets` and how they were drawn."""

    sets: list[list[Head]]
    pool: list[Head]
    how: str
    exhaustive: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sets)

    def __iter__(self):
        return iter(self.sets)


def sample_head_sets(
    model: HookedTransformer,
    n_draws: int,
    *,
    size: int | None = None,
    like: Sequence[Head] | None = None,
    pool: Iterable[Head] | None = None,
    exclude: Iterable[Head] = (),
    seed: int = 0,
    live_only: bool = True,
) -> HeadSetDraws:
    """``n_draws`` random head sets: the library's one sampler for random-head controls.

    Heads are drawn from ``pool`` (default :func:`live_heads`) minus ``exclude`` (pass the heads under
    test). With ``live_only=True`` (default) a given ``pool`` is cut to its live heads, so a control never
    holds a switched-off head (ablating one changes nothing: such a "control" only tests live vs dead);
    ``how`` names the dead heads left out. ``live_only=False`` uses ``pool`` as given (for combinatorics
    on a pool of your own). ``like``: the heads a control is compared with; each draw then takes, for every
    head of ``like``, one head of the same layer (layer-matched, without repeats). Otherwise ``size``
    heads uniformly. When the pool allows at most ``n_draws`` distinct sets, every one of them is returned
    once (``exhaustive=True``): an exact control instead of a sample. Seeded numpy generator.
    Too few heads in the pool: ValueError saying which layer (or the pool) is short.
    """
    live = live_heads(model)
    given = [(int(l), int(h)) for l, h in (live if pool is None else pool)]
    dead_dropped: list[Head] = []
    if live_only and pool is not None:
        live_set = set(live)
        dead_dropped = sorted({hd for hd in given if hd not in live_set})
        given = [hd for hd in given if hd in live_set]
    ex = {(int(l), int(h)) for l, h in exclude}
    avail = sorted(set(given) - ex)
    dropped = (f" ({len(dead_dropped)} switched-off heads of the given pool left out)" if dead_dropped else "")
    rng = np.random.default_rng(seed)
    if like is not None:
        need: dict[int, int] = {}
        for l, _ in like:
            need[int(l)] = need.get(int(l), 0) + 1
        per_layer = {l: [hd for hd in avail if hd[0] == l] for l in need}
        short = {l: (len(per_layer[l]), k) for l, k in need.items() if len(per_layer[l]) < k}
        if short:
            raise ValueError("too few heads for layer-matched sets: " + ", ".join(
                f"layer {l} has {have} other {'live ' if live_only else ''}heads in the pool, needs {k}"
                for l, (have, k) in sorted(short.items()))
                + " (widen pool= or leave out like= to draw unmatched sets)")
        total = math.prod(math.comb(len(per_layer[l]), k) for l, k in need.items())
        how = f"layer-matched to {', '.join(head_name(h) for h in like)}"
        if total <= n_draws:
            combos = itertools.product(*[itertools.combinations(per_layer[l], k) for l, k in sorted(need.items())])
            sets = [sorted(h for part in c for h in part) for c in combos]
            return HeadSetDraws(sets, avail, how + f"; all {total} possible sets" + dropped, exhaustive=True)
        sets = []
        for _ in range(n_draws):
            s = []
            for l, k in sorted(need.items()):
                idx = rng.choice(len(per_layer[l]), size=k, replace=False)
                s += [per_layer[l][i] for i in idx]
            sets.append(sorted(s))
        return HeadSetDraws(sets, avail, how + f"; {n_draws} draws (seed {seed})" + dropped)
    if size is None:
        raise ValueError("sample_head_sets needs size= (heads per set) or like= (heads to match by layer)")
    kind = "live heads" if live_only else "heads"
    if size > len(avail):
        raise ValueError(f"cannot draw {size} heads from a pool of {len(avail)} {kind} (after excluding "
                         f"{len(ex)}): widen pool= or lower size=")
    total = math.comb(len(avail), size)
    if total <= n_draws:
        sets = [list(c) for c in itertools.combinations(avail, size)]
        return HeadSetDraws(sets, avail, f"all {total} sets of {size} from {len(avail)} {kind}" + dropped,
                            exhaustive=True)
    sets = [sorted(avail[i] for i in rng.choice(len(avail), size=size, replace=False)) for _ in range(n_draws)]
    return HeadSetDraws(sets, avail, f"{n_draws} draws of {size} from {len(avail)} {kind} (seed {seed})" + dropped)


def control_sets(
    model: HookedTransformer, heads: Sequence[Head], n_draws: int, *, seed: int = 0, also_exclude: Iterable[Head] = ()
) -> HeadSetDraws:
    """Random head sets to compare ``heads`` with, drawn only from the **live** heads (:func:`live_heads`)
    outside ``heads`` and outside ``also_exclude`` (e.g. the measured task's own circuit):

    1. layer-matched to ``heads`` (:func:`sample_head_sets` with ``like=heads``);
    2. when a layer has too few such heads, size-matched draws from them; ``how`` says
       "not layer-matched" and which layer was short;
    3. when fewer live heads remain than ``heads`` has, **no control set**: an empty result
       (``len(draws) == 0``, ``meta["no_test"]`` = the reason, ``how`` starting "no control sets") and
       callers run no test (p-value None). Never widened to switched-off heads: ablating a dead head
       changes nothing, so such sets would test live vs dead, not the heads against comparable ones.
    """
    also_exclude = list(also_exclude)  # read twice below: a generator would leave the note empty
    heads = [(int(l), int(h)) for l, h in heads]
    exclude = sorted({*heads, *((int(l), int(h)) for l, h in also_exclude)})
    note = f" (also excluding {', '.join(head_name(h) for h in also_exclude)})" if also_exclude else ""
    live = live_heads(model)
    try:
        d = sample_head_sets(model, n_draws, like=heads, pool=live, exclude=exclude, seed=seed)
        d.how += note
        return d
    except ValueError as exc:
        matched = str(exc).split(" (widen")[0].replace("too few heads for layer-matched sets: ", "")
    try:
        d = sample_head_sets(model, n_draws, size=len(heads), pool=live, exclude=exclude, seed=seed)
    except ValueError:
        avail = sorted(set(live) - set(exclude))
        also = f" and {', '.join(head_name(h) for h in also_exclude)}" if also_exclude else ""
        reason = (f"{len(heads)} heads per set needed, only {len(avail)} live head{'' if len(avail) == 1 else 's'} "
                  f"outside the heads under test{also} ({', '.join(head_name(h) for h in avail) or 'none'}); "
                  "switched-off heads are never used as controls")
        return HeadSetDraws([], avail, f"no control sets: {reason}", meta={"no_test": reason})
    d.how += note + f" (not layer-matched: {matched})"
    return d
