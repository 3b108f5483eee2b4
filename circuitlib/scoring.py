"""MAPS head scores (Elhelo & Geva 2024): static (from parameters), suppression, and dynamic.

**Static score** of head ``(l, h)`` for a relation of (source, target) token pairs::

    m_s = x_s · W_V^h · W_O^h · W_U          score = fraction of pairs whose target is in top-k(m_s)

Conventions (they change numbers):

- ``x_s`` (:func:`maps_inputs`): the raw token embedding ``W_E[s]`` for layer 0; for layers >= 1 the
  output of block 0's MLP applied to ``LN2_0(W_E[s])`` (the MLP output alone, not embedding + MLP).
  Attention-only models (the embedded toy model) have no MLP: there ``x_s = W_E[s]`` at every layer.
- No positional embedding, no biases (``b_V``, ``b_O``), no final LayerNorm; the model's weights as
  loaded (``load_model`` gives unprocessed weights, as MAPS uses).
- ``k``: the relation's default (1 for copying relations, 10 otherwise) unless given. "In the top-k"
  means fewer than ``k`` vocabulary entries score strictly higher than the target.
- **Suppression** score: the same test on ``-m_s`` (the head pushes the target *down*).

**Dynamic score** (:func:`dynamic_scores`): prompts from a neutral template containing the source
("This is a document about [X]", BOS prepended); the head's output at the last position through
``W_O`` and ``W_U`` (again no ``b_O``, no final LN), same top-k test, averaged over prompts.
"With context" = the normal forward pass; "without context" = the head's last-position attention
forced onto the source token while everything downstream sees the clean run (MAPS's construction),
which makes the head's output exactly its value vector at the source position in the clean run.

Speed: every score reduces to "how many vocabulary entries beat the target logit?". We count that
over vocabulary chunks of growing size and stop a (head, pair) as soon as ``k`` entries beat its
target, so most of the ``|V|``-wide products are never computed; the rows of all heads of a block
of layers and all relations' unique sources go through one matrix product per chunk, and no
``|V| x |V|`` (or per-head ``W_O W_U``) matrix is ever formed. Results are exact: identical top-k
membership to ``torch.topk`` on the full logits, up to floating-point ties.

Where things are: :func:`causal_check` (top heads vs random vs control heads, ablated) is here and
uses :func:`circuitlib.ablation.ablation_curves`; :func:`relation_summary` bundles everything the
report stores per relation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .tasks import load_relation
from .tasks._common import encode, word_id
from .types import Head, HeadScores, RelationPairs, head_name, parse_head

DYNAMIC_TEMPLATE = "This is a document about [X]"
REFERENCE_FILE = Path(__file__).parent / "data" / "reference_heads.json"
_FIRST_CHUNK = 256
_MAX_CHUNK = 16384
_MAX_ELEMENTS = 2**26  # logits per vocabulary chunk (256 MiB in float32)


# ---------------------------------------------------------------------------------------------
# Inputs and the core top-k counter


@torch.no_grad()
def maps_inputs(model, token_ids: Int[Tensor, " n_tok"]) -> Float[Tensor, "n_layers n_tok d_model"]:
    """MAPS's per-layer input ``x_s`` for each token: ``W_E[s]`` at layer 0, ``MLP_0(LN2_0(W_E[s]))``
    (MLP output only) at layers >= 1. Attention-only models: ``W_E[s]`` at every layer.
    No positional embedding."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).to(model.W_E.device)
    emb = model.W_E[token_ids]
    n_layers = model.cfg.n_layers
    if model.cfg.attn_only or model.cfg.d_mlp is None:
        return emb[None].expand(n_layers, -1, -1).clone()
    block = model.blocks[0]
    mlp_out = block.mlp(block.ln2(emb[None]))[0]
    return torch.cat([emb[None], mlp_out[None].expand(n_layers - 1, -1, -1)])


def _check_k(k: int, d_vocab: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_vocab:
        raise ValueError(
            f"k must be an integer in [1, {d_vocab}] (the vocabulary size); got {k!r}. MAPS uses "
            "k=1 for copying relations and k=10 otherwise."
        )
    return k


@torch.no_grad()
def topk_hits(
    rows: Float[Tensor, "n_rows d_model"],
    W_U_T: Float[Tensor, "d_vocab d_model"],
    row_of_pair: Int[Tensor, " n_pairs"],
    targets: Int[Tensor, " n_pairs"],
    k: Int[Tensor, " n_pairs"] | int,
    *,
    suppression: bool = False,
) -> Bool[Tensor, " n_pairs"]:
    """Whether each pair's target is in the top-k of ``rows[row_of_pair] @ W_U`` (of its negation
    with ``suppression``): fewer than ``k`` other entries strictly higher.

    ``W_U_T`` is the unembedding transposed and contiguous (``W_U.T.contiguous()``, one row per
    vocabulary entry), so each vocabulary chunk is a contiguous block. Exact early-exit count over
    chunks (first 256 entries, then doubling): a pair stops once ``k`` entries beat its target.
    Never forms more than ``live rows x chunk`` logits.
    """
    sign = -1.0 if suppression else 1.0
    n_pairs, d_vocab = row_of_pair.shape[0], W_U_T.shape[0]
    k = torch.as_tensor(k).expand(n_pairs) if not isinstance(k, Tensor) or k.ndim == 0 else k
    uniq_t, t_index = torch.unique(targets, return_inverse=True)
    thr = sign * (rows @ W_U_T[uniq_t].T)[row_of_pair, t_index]
    count = torch.zeros(n_pairs, dtype=torch.long)
    live = torch.arange(n_pairs)
    start, size = 0, _FIRST_CHUNK
    while start < d_vocab and live.numel():
        used, inv = torch.unique(row_of_pair[live], return_inverse=True)
        end = min(start + max(_FIRST_CHUNK, min(size, _MAX_ELEMENTS // live.numel())), d_vocab)
        logits = sign * (rows[used] @ W_U_T[start:end].T)
        above = logits[inv] > thr[live, None]
        own = (targets[live] >= start) & (targets[live] < end)  # never count the target itself
        above[own.nonzero()[:, 0], targets[live][own] - start] = False
        count[live] += above.sum(-1)
        live = live[count[live] < k[live]]
        start, size = end, min(2 * size, _MAX_CHUNK)
    return count < k


def _as_pairs(model, relation: RelationPairs | str) -> RelationPairs:
    if isinstance(relation, RelationPairs):
        return relation
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass a RelationPairs instead of a relation name")
    return load_relation(relation, model.tokenizer)


def _model_name(model) -> str:
    return str(getattr(model.cfg, "model_name", "") or "unknown")


# ---------------------------------------------------------------------------------------------
# Static scores


def static_scores(
    model, relation: RelationPairs | str, *, k: int | None = None, suppression: bool = False
) -> HeadScores:
    """MAPS static (or, with ``suppression``, suppression) score of every head for one relation.

    ``relation``: a :class:`RelationPairs` or a relation name (loaded with the model's tokenizer).
    ``k`` defaults to the relation's (1 copying, 10 otherwise). See the module docstring for ``x_s``.
    """
    pairs = _as_pairs(model, relation)
    return static_scores_many(model, [pairs], k=k, suppression=suppression)[pairs.name]


@torch.no_grad()
def static_scores_many(
    model,
    relations: Sequence[RelationPairs | str],
    *,
    k: int | None = None,
    suppression: bool = False,
    max_rows: int = 8192,
) -> dict[str, HeadScores]:
    """:func:`static_scores` for several relations at once, keyed by relation name.

    All relations' unique source tokens and all heads of a block of layers (about ``max_rows``
    (head, source) rows) go through one early-exit top-k count; ``k`` overrides every relation's
    default when given.
    """
    rels = [_as_pairs(model, r) for r in relations]
    d_vocab, L, H = model.cfg.d_vocab, model.cfg.n_layers, model.cfg.n_heads
    ks = [_check_k(k if k is not None else r.k, d_vocab) for r in rels]
    if any(len(r) == 0 for r in rels):
        raise ValueError("a relation has no pairs left after the single-token filter; nothing to score")
    sources, src_index = torch.unique(torch.cat([r.src for r in rels]), return_inverse=True)
    n_src = sources.shape[0]
    x = maps_inputs(model, sources)  # [L, n_src, d]
    targets = torch.cat([r.tgt for r in rels])
    k_pair = torch.cat([torch.full((len(r),), kk) for r, kk in zip(rels, ks)])
    hits = torch.empty(L, H, targets.shape[0], dtype=torch.bool)
    W_U_T = model.W_U.T.contiguous()
    step = max(1, max_rows // (H * n_src))  # layers per block: bounds rows x chunk in topk_hits
    for lo in range(0, L, step):
        layers = range(lo, min(lo + step, L))
        # (model.W_V etc. stack every layer on each access: read each block's weights instead)
        rows = torch.cat([
            torch.einsum("sd,hde,hem->hsm", x[l], model.blocks[l].attn.W_V, model.blocks[l].attn.W_O)
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
            model=_model_name(model),
            k=kk,
            meta={"pairs_used": len(r), "pairs_total": r.total, "suppression": suppression,
                  "inputs": "layer 0: W_E[s]; layers >= 1: MLP_0(LN2_0(W_E[s])) (W_E[s] if attn-only)",
                  "weights": "as loaded (unprocessed by default); no biases, no final LN"},
        )
    return out


@torch.no_grad()
def top_mapped_tokens(
    model, head: Head | str, source: str | int, n: int = 10, suppression: bool = False
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
    attn = model.blocks[layer].attn
    m = x @ attn.W_V[h] @ attn.W_O[h] @ model.W_U
    m = -m if suppression else m
    vals, idx = torch.topk(m, min(n, m.shape[0]))
    return [(model.tokenizer.decode([int(i)]), round(float(v), 4)) for v, i in zip(vals, idx)]


# ---------------------------------------------------------------------------------------------
# Dynamic scores


def dynamic_prompts(
    model, pairs: RelationPairs, template: str = DYNAMIC_TEMPLATE
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Token ids of ``template`` filled with each source word (BOS prepended, right-padded), the
    position of the source token and of the last token in each prompt."""
    if "[X]" not in template:
        raise ValueError(f"template {template!r} has no [X] placeholder for the source word")
    rows, src_pos = [], []
    for word, tok in zip(pairs.src_words, pairs.src.tolist()):
        ids = encode(model.tokenizer, template.replace("[X]", word))
        where = [i for i, t in enumerate(ids) if t == tok]
        if not where:
            raise ValueError(
                f"source {word!r} is not one token inside {template.replace('[X]', word)!r}: put a "
                "space before [X] in the template (MAPS's single-token filter uses ' ' + word)"
            )
        rows.append(ids)
        src_pos.append(where[-1])
    seq = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else rows[0][0]
    tokens = torch.tensor([r + [pad] * (seq - len(r)) for r in rows], dtype=torch.long)
    return tokens, torch.tensor(src_pos), torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def dynamic_scores(
    model,
    relation: RelationPairs | str,
    *,
    template: str = DYNAMIC_TEMPLATE,
    context: bool = True,
    k: int | None = None,
    suppression: bool = False,
    batch_size: int = 64,
) -> HeadScores:
    """MAPS dynamic score of every head: top-k test on the head's last-position output ``z W_O W_U``.

    ``context=True``: the normal forward pass. ``context=False``: the head's last-position attention
    forced onto the source token with all other heads' outputs clean — its output is then its value
    vector ``v`` (``b_V`` included, as in the forward pass) at the source position of the clean run.
    One forward pass per prompt batch serves all heads.
    """
    pairs = _as_pairs(model, relation)
    k = _check_k(k if k is not None else pairs.k, model.cfg.d_vocab)
    tokens, src_pos, end = dynamic_prompts(model, pairs, template)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    hook = "hook_z" if context else "hook_v"
    W_O, W_U_T = model.W_O, model.W_U.T.contiguous()
    hits = []
    for lo in range(0, tokens.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        _, cache = model.run_with_cache(
            tokens[sl].to(model.cfg.device), names_filter=lambda name: name.endswith(f"attn.{hook}")
        )
        rows_idx = torch.arange(tokens[sl].shape[0])
        pos = end[sl] if context else src_pos[sl]
        z = torch.stack([cache[f"blocks.{l}.attn.{hook}"][rows_idx, pos] for l in range(L)])  # [L,b,H,e]
        out = torch.einsum("lbhe,lhem->lhbm", z, W_O)  # [L, H, b, d]
        b = z.shape[1]
        rows = out.reshape(L * H * b, -1)
        tgt = pairs.tgt[sl].repeat(L * H)
        hits.append(topk_hits(rows, W_U_T, torch.arange(L * H * b), tgt, k,
                              suppression=suppression).view(L, H, b))
    score = torch.cat(hits, dim=-1).float().mean(-1)
    return HeadScores(
        scores=score,
        method=f"maps_dynamic_{'with' if context else 'without'}_context" + ("_suppression" if suppression else ""),
        target=pairs.name,
        model=_model_name(model),
        k=k,
        meta={"pairs_used": len(pairs), "template": template, "context": context,
              "suppression": suppression, "bos": True, "position": "last token",
              "readout": "z W_O W_U (no b_O, no final LN)"},
    )


def static_dynamic_correlation(static: HeadScores, dynamic: HeadScores) -> float:
    """Pearson r between two score maps over all heads; ``nan`` if either map is constant."""
    if static.scores.shape != dynamic.scores.shape:
        raise ValueError(f"score maps differ in shape: {tuple(static.scores.shape)} vs {tuple(dynamic.scores.shape)}")
    a, b = static.scores.flatten().double(), dynamic.scores.flatten().double()
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


