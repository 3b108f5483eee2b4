"""MAPS head scores (Elhelo & Geva 2024): static (from parameters), suppression, and dynamic.

**Static score** of head ``(l, h)`` for a relation of (source, target) token pairs::

    m_s = x_s · W_V^h · W_O^h · W_U          score = fraction of pairs whose target is in top-k(m_s)

Every convention below changes numbers. Where the MAPS authors' code (``amitelhelo/MAPS``,
``src/maps.py``, ``src/utils.py``, ``src/experiment1_correlative.py``) fixes one, circuitlib follows it.

- ``x_s`` (:func:`maps_inputs`): the raw token embedding ``W_E[s]`` for layer 0; for layers >= 1 the
  output of block 0's MLP applied to ``LN2_0(W_E[s])`` (the MLP output alone, not embedding + MLP).
  Attention-only models (the embedded toy model) have no MLP: there ``x_s = W_E[s]`` at every layer.
- No positional embedding, no biases (``b_V``, ``b_O``), no final LayerNorm; the model's weights as
  loaded (``load_model`` gives unprocessed weights, as MAPS uses). Grouped-query attention: a query
  head uses its key/value group's ``W_V`` (TransformerLens's ``W_V`` repeats it per query head, the
  same matrix the authors' ``get_w_vo`` picks).
- Pairs: MAPS's single-token filter (``" " + word`` is one token on both sides, >= 30 pairs;
  :mod:`circuitlib.tasks.relations`).
- ``k``: 1 for copying relations, 10 otherwise (Llama-3: below), unless given.
- **Ties**: a target is a hit when fewer than ``k`` *other* vocabulary entries score **at least as
  high** as the target. This is membership in ``torch.topk(m_s, k)`` (the authors' test) whenever
  that is well defined; when the target ties with other entries across the k-th place, ``topk``
  keeps an arbitrary subset of the tied entries, and circuitlib counts the target as a **miss**. A
  head whose OV output is exactly zero (every entry ties) therefore scores 0, never 1. Ties are
  recognised when the logits are bitwise equal; an entry within float rounding of the target can
  land on either side, as in any float top-k.
- **Suppression** score: the same test on ``-m_s`` (the head pushes the target *down*).

**Model-specific conventions, keyed by model name** (:func:`maps_conventions`), as the authors'
code applies them (``utils.get_k``; ``apply_first_mlp`` in ``experiment1_correlative`` and
``experiment2_causal``). Names are matched as substrings of ``model.cfg.model_name``,
case-insensitively (the authors match case-sensitively; ``llama-30b``, the original LLaMA, is not
taken for Llama-3):

- name contains ``Llama-3``: ``k = 3`` for copying relations, ``k = 25`` otherwise (copying: "copying"
  in the relation's name, the authors' test);
- name contains ``Llama-3.1-70B``: no first-MLP input: ``x_s = W_E[s]`` at every layer;
- the embedded model (name ``toy``, or circuitlib's word-level tokenizer): BOS on dynamic prompts
  (below). Every other model: ``k`` = 1 / 10, first-MLP inputs, BOS as below.

HeadScores ``meta`` records the inputs, the ``k`` rule, the tie rule and which name rules fired.

**Model families** (what differs is asked of :mod:`circuitlib.adapter`): the first-MLP input is block
0's MLP on block 0's second normalisation for sequential and parallel-attention (Pythia) blocks alike
(the authors' ``first_mlp``, on any TransformerLens model), with the model's own normalisation
(RMSNorm for Llama); grouped-query attention reads each query head's group (static: ``W_V``; dynamic
without context: ``v``); rotary / shortformer positions never enter static scores. Tested on
GPT-2-style, Llama-style, Pythia-style and shortformer attention-only models against per-head
``torch.topk`` loops (``tests/test_families.py``).

**Dynamic score** (:func:`dynamic_scores`), the authors' experiment 1: each template in
:data:`MAPS_TEMPLATES` (``"No <X> means no"``, ``"The story of <X> contains"``, ``"This is a
document about <X>"``, ``"When I think about <X> I think about"``) is filled with every pair's source
word; the head's output at the **last position** goes through ``W_O`` and ``W_U`` (no ``b_O``, no
final LN) and takes the same top-k test; a template's score is the fraction of pairs that hit.

- "With context" = the normal forward pass. "Without context" = the head's last-position attention
  forced onto the source token while everything downstream sees the clean run (the authors'
  construction), which makes the head's output exactly its value vector (``b_V`` included) at the
  source position of the clean run (grouped-query attention: its key/value group's vector).
- **BOS** (``bos=``): by default as the authors' pipeline tokenizes — a fresh Hugging Face
  tokenizer's default: no BOS for GPT-2 / Pythia / GPT-Neo / GPT-J (their tokenizers add none; this
  holds even when TransformerLens attached a BOS-adding tokenizer to the model), BOS when the
  tokenizer adds one itself (Llama, ...). The embedded model **keeps BOS**: it was trained with BOS
  on every sequence and never saw one without it. ``bos=True`` / ``False`` overrides.
- **Source position**: where the template's placeholder falls (the authors read it off the first
  prompt; all prompts share it since every source is one token). Prompts of different lengths are
  right-padded (the authors' batch requires equal lengths); "last position" is each prompt's own.
- **Templates**: all four by default; templates with words the tokenizer does not know are dropped
  and named in ``meta["templates_dropped"]`` (the embedded model's word-level vocabulary spells only
  "This is a document about <X>"). ``HeadScores.scores`` is the mean of the per-template maps;
  ``meta["per_template"]`` keeps each map.
- **Correlation** (:func:`static_dynamic_correlation`): Pearson r over all templates pooled, as the
  authors compute it: the static map repeated once per template against the per-template dynamic
  maps (``n_templates * n_layers * n_heads`` points) — not r against the mean map.

Speed: every score reduces to "how many vocabulary entries reach the target logit?". We count that
over vocabulary chunks of growing size and stop a (head, pair) as soon as ``k`` entries reach its
target, so most of the ``|V|``-wide products are never computed; the rows of all heads of a block
of layers and all relations' unique sources go through one matrix product per chunk, and no
``|V| x |V|`` (or per-head ``W_O W_U``) matrix is ever formed. Results are exact (the tie rule above).

The MAPS causal check lives in :mod:`circuitlib.causal`; what the report stores per relation in
:func:`circuitlib.report.relation_summary`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from . import adapter
from ._cores import on_free_cores
from .adapter import NO_BOS_ARCHITECTURES  # noqa: F401  (kept importable from here)
from .tasks import load_relation
from .tasks._common import bos_id, pad_id, word_id
from .types import Head, HeadScores, RelationPairs, parse_head

#: The four templates of the MAPS authors' experiment 1 (``experiment1_correlative.TEMPLATES``).
MAPS_TEMPLATES: tuple[str, ...] = (
    "No <X> means no",
    "The story of <X> contains",
    "This is a document about <X>",
    "When I think about <X> I think about",
)
DYNAMIC_TEMPLATE = "This is a document about <X>"  # dynamic_prompts' default (one template)
_PLACEHOLDERS = ("<X>", "[X]")  # the authors' placeholder; circuitlib's older one still works
REFERENCE_FILE = Path(__file__).parent / "data" / "reference_heads.json"
_FIRST_CHUNK = 256
_MAX_CHUNK = 16384
_MAX_ELEMENTS = 2**26  # logits per vocabulary chunk (256 MiB in float32)


# ---------------------------------------------------------------------------------------------
# Model-specific conventions


@dataclass(frozen=True)
class MapsConventions:
    """The MAPS conventions that depend on the model, decided from its name (see module docstring).

    ``k_copying`` / ``k_other``: default ``k`` for copying / other relations (``None`` = the
    relation's own default, 1 / 10). ``first_mlp``: layers >= 1 read ``MLP_0(LN2_0(W_E[s]))``.
    ``embedded``: circuitlib's embedded model (BOS on dynamic prompts). ``notes``: which rules fired.
    """

    model: str
    k_copying: int | None = None
    k_other: int | None = None
    first_mlp: bool = True
    embedded: bool = False
    notes: tuple[str, ...] = ()


def maps_conventions(model: HookedTransformer | str) -> MapsConventions:
    """The MAPS conventions for ``model`` (a ``HookedTransformer`` or a model name)."""
    name = model if isinstance(model, str) else adapter.model_name(model)
    low = name.lower()
    kw, notes = {}, []
    if re.search(r"llama-3(?!\d)", low):  # Llama-3, Llama-3.1, ...; not the original llama-30b
        kw.update(k_copying=3, k_other=25)
        notes.append("Llama-3 (by name): k = 3 for copying relations, 25 otherwise")
    if re.search(r"llama-3\.1-70b", low):
        kw.update(first_mlp=False)
        notes.append("Llama-3.1-70B (by name): no first-MLP input, x_s = W_E[s] at every layer")
    tok = None if isinstance(model, str) else getattr(model, "tokenizer", None)
    if name == "toy" or getattr(tok, "unk_token", None) == "[UNK]":
        kw.update(embedded=True)
        notes.append("embedded model: trained with BOS on every sequence, so dynamic prompts keep BOS")
    return MapsConventions(model=name, notes=tuple(notes), **kw)


def default_k(model: HookedTransformer | str, relation: RelationPairs) -> int:
    """MAPS's ``k`` for ``relation`` on ``model``: the authors' ``get_k`` (Llama-3: 3 / 25 by
    whether "copying" is in the relation's name), else the relation's own (1 copying, 10 otherwise)."""
    conv = maps_conventions(model)
    if conv.k_copying is not None and "copying" in relation.name:
        return conv.k_copying
    if conv.k_other is not None and "copying" not in relation.name:
        return conv.k_other
    return relation.k


def _k_rule(conv: MapsConventions) -> str:
    if conv.k_copying is not None:
        return f"{conv.k_copying} for copying relations, {conv.k_other} otherwise (by model name)"
    return "1 for copying relations, 10 otherwise"


def dynamic_bos(model: HookedTransformer) -> tuple[bool, str]:
    """Whether dynamic prompts start with BOS by default, and why (see module docstring)."""
    if maps_conventions(model).embedded:
        return True, "BOS: the embedded model was trained with BOS on every sequence"
    return adapter.hf_tokenizer_adds_bos(model)


# ---------------------------------------------------------------------------------------------
# Inputs and the core top-k counter


@torch.no_grad()
def maps_inputs(
    model: HookedTransformer, token_ids: Int[Tensor, " n_tok"], *, first_mlp: bool | None = None
) -> Float[Tensor, "n_layers n_tok d_model"]:
    """MAPS's per-layer input ``x_s`` for each token: ``W_E[s]`` at layer 0, ``MLP_0(LN2_0(W_E[s]))``
    (MLP output only) at layers >= 1. ``W_E[s]`` at every layer for attention-only models and when
    ``first_mlp`` is False (default: :func:`maps_conventions`, i.e. False for Llama-3.1-70B).
    No positional embedding."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).to(model.W_E.device)
    emb = model.W_E[token_ids]
    n_layers = model.cfg.n_layers
    if first_mlp is None:
        first_mlp = maps_conventions(model).first_mlp
    if not adapter.has_mlps(model) or not first_mlp:
        return emb[None].expand(n_layers, -1, -1).clone()
    mlp_out = adapter.maps_first_mlp(model, emb)
    return torch.cat([emb[None], mlp_out[None].expand(n_layers - 1, -1, -1)])


def _inputs_note(model: HookedTransformer) -> str:
    if not adapter.has_mlps(model):
        return "W_E[s] at every layer (attention-only model)"
    if not maps_conventions(model).first_mlp:
        return "W_E[s] at every layer (no first-MLP input for this model, by name)"
    return "layer 0: W_E[s]; layers >= 1: MLP_0(LN2_0(W_E[s]))"


def _check_k(k: int, d_vocab: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_vocab:
        raise ValueError(
            f"k must be an integer in [1, {d_vocab}] (the vocabulary size); got {k!r}. MAPS uses "
            "k=1 for copying relations and k=10 otherwise (Llama-3: 3 and 25)."
        )
    return k


@torch.no_grad()
def topk_hits(
    rows: Float[Tensor, "n_rows d_model"],
    W_U_T: Float[Tensor, "d_vocab d_model"],
    row_of_pair: Int[Tensor, " n_pairs"],
    targets: Int[Tensor, " n_pairs"],
    k: Int[Tensor, " n_pairs"] | Int[Tensor, ""] | int,
    *,
    suppression: bool = False,
) -> Bool[Tensor, " n_pairs"]:
    """Whether each pair's target is in the top-k of ``rows[row_of_pair] @ W_U`` (of its negation
    with ``suppression``): fewer than ``k`` *other* entries score at least as high as the target.

    That is ``target in torch.topk(logits, k).indices`` (MAPS's test) whenever the answer does not
    depend on how ``topk`` breaks ties; a target tied with other entries across the k-th place is a
    miss (so an all-zero row is a miss for every target).

    ``W_U_T`` is the unembedding transposed, one row per vocabulary entry: pass ``model.W_U.T`` (a view;
    a contiguous copy works too but costs a ``|V| x d_model`` copy). Exact early-exit count over
    chunks (first 256 entries, then doubling): a pair stops once ``k`` entries reach its target.
    Never forms more than ``live rows x chunk`` logits.

    Speed (results do not depend on it): pairs are processed sorted by row, so while their rows are
    distinct (the usual case: one row per (head, source)) each chunk is one matrix product on the live
    rows with no gather of logits; suppression compares ``logits <= target logit`` (exactly
    ``-logits >= -target``) instead of negating the logits; few, large tensor operations per chunk,
    because every operation is a parallel region whose threads all wait for the slowest one — on a
    busy machine many small operations cost far more than their arithmetic.
    """
    n_pairs, d_vocab = row_of_pair.shape[0], W_U_T.shape[0]
    k = torch.as_tensor(k).expand(n_pairs) if not isinstance(k, Tensor) or k.ndim == 0 else k
    order = torch.argsort(row_of_pair, stable=True)
    rp, tg, kk = row_of_pair[order], targets[order], k[order]
    uniq_t, t_index = torch.unique(tg, return_inverse=True)
    thr = (rows @ W_U_T[uniq_t].T)[rp, t_index]  # each pair's target logit
    count = torch.zeros(n_pairs, dtype=torch.long)
    live = torch.arange(n_pairs)
    start, size = 0, _FIRST_CHUNK
    while start < d_vocab and live.numel():
        n_live = live.numel()
        rl = rp[live]  # sorted
        end = min(start + max(_FIRST_CHUNK, min(size, _MAX_ELEMENTS // n_live)), d_vocab)
        W = W_U_T[start:end].T
        if n_live == 1 or bool((rl[1:] != rl[:-1]).all()):  # distinct rows: one product, no gather
            logits = (rows if n_live == rows.shape[0] else rows[rl]) @ W  # (sorted + distinct + all = identity)
        else:
            used, inv = torch.unique_consecutive(rl, return_inverse=True)
            logits = (rows[used] @ W)[inv]
        t_live = thr[live, None]
        reach = logits <= t_live if suppression else logits >= t_live  # a tie counts against the target
        tl = tg[live]
        own = ((tl >= start) & (tl < end)).nonzero()[:, 0]  # never count the target itself
        reach[own, tl[own] - start] = False
        count[live] += reach.sum(-1, dtype=torch.int32)  # (int32: half the time of the default int64 sum)
        live = live[count[live] < kk[live]]
        start, size = end, min(2 * size, _MAX_CHUNK)
    hits = torch.empty(n_pairs, dtype=torch.bool)
    hits[order] = count < kk
    return hits


def _as_pairs(model: HookedTransformer, relation: RelationPairs | str) -> RelationPairs:
    if isinstance(relation, RelationPairs):
        return relation
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass a RelationPairs instead of a relation name")
    return load_relation(relation, model.tokenizer)


# ---------------------------------------------------------------------------------------------
# Static scores


def static_scores(
    model: HookedTransformer, relation: RelationPairs | str, *, k: int | None = None, suppression: bool = False
) -> HeadScores:
    """MAPS static (or, with ``suppression``, suppression) score of every head for one relation.

    ``relation``: a :class:`RelationPairs` or a relation name (loaded with the model's tokenizer).
    ``k`` defaults to :func:`default_k` (1 copying, 10 otherwise; Llama-3: 3 / 25). See the module
    docstring for ``x_s`` and ties.
    """
    pairs = _as_pairs(model, relation)
    return static_scores_many(model, [pairs], k=k, suppression=suppression)[pairs.name]


@on_free_cores
@torch.no_grad()
def static_scores_many(
    model: HookedTransformer,
    relations: Sequence[RelationPairs | str],
    *,
    k: int | None = None,
    suppression: bool = False,
    max_rows: int = 65536,
    threads: int | None = None,
) -> dict[str, HeadScores]:
    """:func:`static_scores` for several relations at once, keyed by relation name.

    All relations' unique source tokens and all heads of a block of layers (at most ``max_rows``
    (head, source) rows, fewer for wide models: ``rows x d_model`` <= 2**26) go through one early-exit
    top-k count; ``k`` overrides every relation's default when given.

    ``threads``: torch intra-op threads for this call (restored afterwards). Default: torch's count,
    capped at the cores other processes leave free (their runnable threads, sampled at the call). The early-exit count is a long sequence of
    short parallel operations, each ending when its slowest thread does; with more threads than free
    cores, a thread that the scheduler parks stalls every one of them, which made this path lose far
    more to a busy machine than a plain per-head loop (issue 14). Scores do not depend on it.
    """
    rels = [_as_pairs(model, r) for r in relations]
    d_vocab, L, H = model.cfg.d_vocab, model.cfg.n_layers, model.cfg.n_heads
    conv = maps_conventions(model)
    ks = [_check_k(k if k is not None else default_k(model, r), d_vocab) for r in rels]
    if any(len(r) == 0 for r in rels):
        raise ValueError("a relation has no pairs left after the single-token filter; nothing to score")
    sources, src_index = torch.unique(torch.cat([r.src for r in rels]), return_inverse=True)
    n_src = sources.shape[0]
    x = maps_inputs(model, sources)  # [L, n_src, d]
    targets = torch.cat([r.tgt for r in rels])
    k_pair = torch.cat([torch.full((len(r),), kk) for r, kk in zip(rels, ks)])
    hits = torch.empty(L, H, targets.shape[0], dtype=torch.bool)
    W_U_T = model.W_U.T  # a view: no |V| x d_model copy
    max_rows = max(1, min(max_rows, _MAX_ELEMENTS // model.cfg.d_model))
    step = max(1, max_rows // (H * n_src))  # layers per block: bounds rows x chunk in topk_hits
    for lo in range(0, L, step):
        layers = range(lo, min(lo + step, L))
        # (model.W_V etc. stack every layer on each access: read each block's weights instead)
        rows = torch.cat([
            torch.einsum("sd,hde,hem->hsm", x[l], adapter.head_W_V(model, l), adapter.head_W_O(model, l))
            .reshape(H * n_src, -1) for l in layers
        ])
        # (layer block, head, pair) -> row (block * H + head) * n_src + source index
        heads = torch.arange(len(layers) * H)
        row_of_pair = (heads[:, None] * n_src + src_index[None, :]).flatten()
        n = heads.shape[0]
        hit = topk_hits(rows, W_U_T, row_of_pair, targets.repeat(n), k_pair.repeat(n),
                        suppression=suppression)
        hits[lo : lo + len(layers)] = hit.view(len(layers), H, -1)
    out, offset = {}, 0
    for r, kk in zip(rels, ks):
        score = hits[:, :, offset : offset + len(r)].float().mean(-1)
        offset += len(r)
        out[r.name] = HeadScores(
            scores=score,
            method="maps_suppression" if suppression else "maps_static",
            target=r.name,
            model=adapter.model_name(model),
            k=kk,
            meta={"pairs_used": len(r), "pairs_total": r.total, "suppression": suppression,
                  "inputs": _inputs_note(model),
                  "k_rule": "given" if k is not None else _k_rule(conv),
                  "ties": "a target tied with other entries across the k-th place is a miss",
                  "model_conventions": list(conv.notes),
                  "weights": "as loaded (unprocessed by default); no biases, no final LN"},
        )
    return out


@torch.no_grad()
def top_mapped_tokens(
    model: HookedTransformer, head: Head | str, source: str | int, n: int = 10, suppression: bool = False
) -> list[tuple[str, float]]:
    """The ``n`` tokens that head's OV circuit maps ``source`` to most strongly: top entries of
    ``m_s = x_s W_V W_O W_U`` (of ``-m_s`` with ``suppression``), as ``(token, logit)`` pairs.

    ``source``: a word (encoded as ``" " + word``, which must be one token) or a token id.
    """
    if isinstance(head, str):
        head = parse_head(head)
    layer, h = head
    if not (0 <= layer < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
        raise ValueError(f"head {layer}.{h} does not exist in a {model.cfg.n_layers}x{model.cfg.n_heads} model")
    if isinstance(source, str):
        tok = word_id(model.tokenizer, source)
        if tok is None:
            raise ValueError(f"{source!r} is not a single token (with a leading space) for this tokenizer")
        source = tok
    x = maps_inputs(model, torch.tensor([int(source)]))[layer, 0]
    m = x @ adapter.head_W_V(model, layer)[h] @ adapter.head_W_O(model, layer)[h] @ model.W_U
    m = -m if suppression else m
    vals, idx = torch.topk(m, min(n, m.shape[0]))
    return [(model.tokenizer.decode([int(i)]), round(float(v), 4)) for v, i in zip(vals, idx)]


# ---------------------------------------------------------------------------------------------
# Dynamic scores


def _placeholder(template: str) -> str:
    for ph in _PLACEHOLDERS:
        if ph in template:
            return ph
    raise ValueError(f"template {template!r} has no <X> (or [X]) placeholder for the source word")


def template_fits(tokenizer, template: str) -> bool:
    """Whether ``tokenizer`` spells ``template`` (without its placeholder) with no unknown token."""
    ids = tokenizer.encode(template.replace(_placeholder(template), ""), add_special_tokens=False)
    unk = tokenizer.unk_token_id
    # (the offline GPT-2 wrapper names <|endoftext|> its unk token: byte-level BPE never emits it)
    return unk is None or unk not in ids


def default_templates(tokenizer) -> tuple[list[str], dict[str, str]]:
    """:data:`MAPS_TEMPLATES` the tokenizer can spell, and the dropped ones with the reason."""
    kept = [t for t in MAPS_TEMPLATES if template_fits(tokenizer, t)]
    dropped = {t: "words unknown to the tokenizer" for t in MAPS_TEMPLATES if t not in kept}
    return kept, dropped


def dynamic_prompts(
    model: HookedTransformer, pairs: RelationPairs, template: str = DYNAMIC_TEMPLATE, *, bos: bool | None = None
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Token ids of ``template`` filled with each source word (right-padded), the position of the
    source token and of the last token in each prompt.

    ``bos``: prepend BOS; default :func:`dynamic_bos` (none for GPT-2 / Pythia, as MAPS; yes for the
    embedded model). The source position is where the template's placeholder falls (the authors
    take it from the first prompt; all prompts share it when the source is one token).
    """
    ph = _placeholder(template)
    use_bos = dynamic_bos(model)[0] if bos is None else bool(bos)
    tok = model.tokenizer
    head = [bos_id(tok)] if use_bos else []
    prefix = template[: template.index(ph)].rstrip(" ")
    at = len(head) + (len(tok.encode(prefix, add_special_tokens=False)) if prefix else 0)
    rows, src_pos = [], []
    for word, s in zip(pairs.src_words, pairs.src.tolist()):
        text = template.replace(ph, word)
        ids = head + list(tok.encode(text, add_special_tokens=False))
        if not (at < len(ids) and ids[at] == s):
            where = [i for i, t in enumerate(ids) if t == s]
            if len(where) != 1:
                raise ValueError(
                    f"source {word!r} is not one token at the placeholder of {text!r}: put a space before "
                    f"{ph} in the template (MAPS's single-token filter uses ' ' + word)"
                )
            at_word = where[0]
        else:
            at_word = at
        rows.append(ids)
        src_pos.append(at_word)
    seq = max(len(r) for r in rows)
    pad = pad_id(tok)
    tokens = torch.tensor([r + [pad] * (seq - len(r)) for r in rows], dtype=torch.long)
    return tokens, torch.tensor(src_pos), torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def _dynamic_hits_one_template(model: HookedTransformer, pairs, template, *, context, k, suppression, bos, batch_size):
    tokens, src_pos, end = dynamic_prompts(model, pairs, template, bos=bos)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    hook = "hook_z" if context else "hook_v"
    W_O, W_U_T = model.W_O, model.W_U.T
    hits = []
    for lo in range(0, tokens.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        _, cache = model.run_with_cache(
            tokens[sl].to(model.cfg.device), names_filter=lambda name: name.endswith(f"attn.{hook}")
        )
        rows_idx = torch.arange(tokens[sl].shape[0])
        pos = end[sl] if context else src_pos[sl]
        per_layer = []
        for l in range(L):
            z = cache[f"blocks.{l}.attn.{hook}"][rows_idx, pos]  # [b, H (or n_kv_heads for v), e]
            per_layer.append(adapter.per_query_head(model, z))  # grouped-query attention: the group's v
        z = torch.stack(per_layer)  # [L, b, H, e]
        out = torch.einsum("lbhe,lhem->lhbm", z, W_O)  # [L, H, b, d]
        b = z.shape[1]
        rows = out.reshape(L * H * b, -1)
        tgt = pairs.tgt[sl].repeat(L * H)
        hits.append(topk_hits(rows, W_U_T, torch.arange(L * H * b), tgt, k,
                              suppression=suppression).view(L, H, b))
    return torch.cat(hits, dim=-1).float().mean(-1)


@torch.no_grad()
def dynamic_scores(
    model: HookedTransformer,
    relation: RelationPairs | str,
    *,
    templates: Sequence[str] | None = None,
    template: str | None = None,
    context: bool = True,
    k: int | None = None,
    suppression: bool = False,
    bos: bool | None = None,
    batch_size: int = 64,
) -> HeadScores:
    """MAPS dynamic score of every head: top-k test on the head's last-position output ``z W_O W_U``.

    ``templates``: default :data:`MAPS_TEMPLATES` (those the tokenizer spells); ``template``: one
    template instead. ``scores`` is the mean of the per-template maps, kept in
    ``meta["per_template"]`` for :func:`static_dynamic_correlation`. ``bos``: default
    :func:`dynamic_bos`. ``k``: default :func:`default_k`.

    ``context=True``: the normal forward pass. ``context=False``: the head's last-position attention
    forced onto the source token with all other heads' outputs clean — its output is then its value
    vector ``v`` (``b_V`` included, as in the forward pass) at the source position of the clean run.
    One forward pass per prompt batch and template serves all heads.
    """
    pairs = _as_pairs(model, relation)
    k = _check_k(k if k is not None else default_k(model, pairs), model.cfg.d_vocab)
    if template is not None and templates is not None:
        raise ValueError("pass either template= (one) or templates= (several), not both")
    dropped: dict[str, str] = {}
    if template is not None:
        templates = [template]
    elif templates is None:
        templates, dropped = default_templates(model.tokenizer)
    templates = list(templates)
    for t in templates:
        _placeholder(t)
    if not templates:
        raise ValueError(f"no template to score with: the tokenizer spells none of {list(MAPS_TEMPLATES)}; "
                         "pass templates=[...]")
    if bos is None:
        use_bos, bos_rule = dynamic_bos(model)
    else:
        use_bos, bos_rule = bool(bos), f"{'BOS' if bos else 'no BOS'}: given (bos={bool(bos)})"
    per_template = {
        t: _dynamic_hits_one_template(model, pairs, t, context=context, k=k, suppression=suppression,
                                      bos=use_bos, batch_size=batch_size)
        for t in templates
    }
    score = torch.stack(list(per_template.values())).mean(0)
    return HeadScores(
        scores=score,
        method=f"maps_dynamic_{'with' if context else 'without'}_context" + ("_suppression" if suppression else ""),
        target=pairs.name,
        model=adapter.model_name(model),
        k=k,
        meta={"pairs_used": len(pairs), "templates": templates, "templates_dropped": dropped,
              "per_template": {t: m.tolist() for t, m in per_template.items()},
              "aggregate": "scores = mean of the per-template maps; r pools the per-template maps",
              "context": context, "suppression": suppression, "bos": use_bos, "bos_rule": bos_rule,
              "position": "last token",
              "model_conventions": list(maps_conventions(model).notes),
              "readout": "z W_O W_U (no b_O, no final LN)"},
    )


def _template_maps(dynamic: HeadScores | Sequence[HeadScores]) -> list[Tensor]:
    if isinstance(dynamic, HeadScores):
        per = dynamic.meta.get("per_template")
        if per:
            return [torch.tensor(m, dtype=torch.float64) for m in per.values()]
        return [dynamic.scores.double()]
    return [m for d in dynamic for m in _template_maps(d)]


def static_dynamic_correlation(static: HeadScores, dynamic: HeadScores | Sequence[HeadScores]) -> float:
    """Pearson r between static and dynamic scores, pooled over templates as the MAPS authors do.

    ``dynamic``: a :func:`dynamic_scores` result (its per-template maps are used) or a sequence of
    per-template maps. The static map is repeated once per template and correlated with the
    concatenated dynamic maps (``n_templates * n_layers * n_heads`` points); with one template this
    is r over the heads. ``nan`` if either side is constant.
    """
    maps = _template_maps(dynamic)
    for m in maps:
        if m.shape != static.scores.shape:
            raise ValueError(f"score maps differ in shape: {tuple(static.scores.shape)} vs {tuple(m.shape)}")
    a = static.scores.flatten().double().repeat(len(maps))
    b = torch.cat([m.flatten() for m in maps])
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float("nan") if denom == 0 else float((a @ b) / denom)


# ---------------------------------------------------------------------------------------------
# Reference head sets


def reference_heads(model_name: str) -> list[Head]:
    """Published heads to mark on heatmaps (``circuitlib/data/reference_heads.json``); ``[]`` if none.

    gpt2-medium: the mover heads of Merullo et al. 2024. Other models: whatever the file lists.
    """
    data = json.loads(REFERENCE_FILE.read_text())
    entry = data.get("models", {}).get(model_name)
    return [parse_head(h) for h in entry["heads"]] if entry else []
