"""The architecture adapter: what circuitlib's analyses need to know about TransformerLens's internals.

Patching (:mod:`circuitlib.patching`) and MAPS scoring (:mod:`circuitlib.scoring`) ask this module, and
nothing else, about the things that differ between model families or that reach past
``HookedTransformer``'s public surface:

- **where positions enter** (:func:`positions_inside_attention`, :func:`shortformer`): absolute position
  vectors in the residual stream (GPT-2), added to every layer's query/key inputs (shortformer, the
  attention-only ``attn-only-Nl`` models), or applied inside attention (rotary: Llama, Pythia, GPT-J;
  ALiBi; relative position bias);
- **running from a later layer** (:func:`forward_from_layer`) with earlier positions as frozen cached
  keys/values (:func:`frozen_kv_cache`), and which activations a restart needs (:func:`restart_activation`);
- **grouped-query attention** (Llama 2 70B, Llama 3, Mistral, ...): which key/value group a query head reads
  (:func:`value_group`), a head's value matrix (:func:`head_W_V`), value vectors per query head
  (:func:`per_query_head`), key/value activations computed per query head (:func:`kv_per_query_head`);
- **MAPS's inputs**: block 0's MLP on its second normalisation (:func:`maps_first_mlp`, :func:`has_mlps`);
- **names and tokenizers**: the model's name (:func:`model_name`), its Hugging Face architecture, and
  whether that architecture's own tokenizer prepends BOS (:func:`hf_tokenizer_adds_bos`).

Two more places know TransformerLens: :mod:`circuitlib.models` (building, loading and processing models)
and :func:`circuitlib.interventions.readout` (final normalisation, unembedding, logit soft-cap). Beyond
these three, circuitlib uses only the surface every ``HookedTransformer`` shares, whatever its family: hook
names (``blocks.{l}.attn.hook_z``, ``hook_q/k/v``, ``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``),
``run_with_cache``, ``model.hooks(...)``, the stacked weights ``W_E``, ``W_U``, ``W_O`` and the config's
sizes (``n_layers``, ``n_heads``, ``d_head``, ``d_vocab``, ``n_ctx``, ``device``).

A move to TransformerLens 4's ``TransformerBridge`` rewrites this module, ``models.py`` and ``readout``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

#: Hugging Face architectures whose tokenizer adds no BOS by default (GPT-2, GPT-NeoX / Pythia, GPT-Neo,
#: GPT-J); TransformerLens attaches a BOS-adding tokenizer to them, the architecture's own one adds none.
NO_BOS_ARCHITECTURES = frozenset({
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GPTNeoForCausalLM", "GPTJForCausalLM",
})
#: Position schemes that add position vectors outside attention (to the residual stream, or to every
#: layer's query/key inputs): everything else happens inside attention.
_ABSOLUTE_POSITIONS = ("standard", "shortformer")


# ---------------------------------------------------------------------------------------------
# Names and config facts


def model_name(model: HookedTransformer) -> str:
    """The name the model was loaded under (``cfg.model_name``), ``"unknown"`` if it has none."""
    return str(getattr(model.cfg, "model_name", "") or "unknown")


def architecture(model: HookedTransformer) -> str | None:
    """The Hugging Face architecture the model was converted from (``LlamaForCausalLM``, ...), if known."""
    return getattr(model.cfg, "original_architecture", None)


def has_mlps(model: HookedTransformer) -> bool:
    """Whether the blocks have MLPs (attention-only models, such as the embedded toy, have none)."""
    return not model.cfg.attn_only and model.cfg.d_mlp is not None


def hf_tokenizer_adds_bos(model: HookedTransformer) -> tuple[bool, str]:
    """Whether the model's architecture's own Hugging Face tokenizer prepends BOS by default, and why.

    GPT-2 / Pythia / GPT-Neo / GPT-J tokenizers add none (even when TransformerLens attached one that
    does); otherwise the attached tokenizer is asked (Llama's adds BOS)."""
    arch = architecture(model)
    if arch in NO_BOS_ARCHITECTURES:
        return False, f"no BOS: {arch}'s tokenizer adds none (as in MAPS's pipeline)"
    tok = model.tokenizer
    probe = tok("a").input_ids
    adds = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
    return adds, ("BOS: the tokenizer adds one (as in MAPS's pipeline)" if adds
                  else "no BOS: the tokenizer adds none (as in MAPS's pipeline)")


# ---------------------------------------------------------------------------------------------
# Positions


def positions_inside_attention(model: HookedTransformer) -> bool:
    """True when positions act inside attention (rotary, ALiBi, relative bias): a token's keys, values
    and everything after them depend on where it sits, so a patched forward recomputes every position.
    False for absolute position vectors (standard, shortformer)."""
    return model.cfg.positional_embedding_type not in _ABSOLUTE_POSITIONS


def shortformer(model: HookedTransformer) -> bool:
    """Shortformer positions: added to every layer's query/key inputs, never to the residual stream."""
    return model.cfg.positional_embedding_type == "shortformer"


def restart_activation(model: HookedTransformer, name: str) -> bool:
    """Whether activation ``name`` is needed to restart a forward pass at a later block:
    the block's residual input, every layer's keys and values (for cached earlier positions), and the
    positional embedding of shortformer models (which ``start_at_layer`` would otherwise skip)."""
    return name.endswith(("hook_resid_pre", "attn.hook_k", "attn.hook_v")) or (
        shortformer(model) and name == "hook_pos_embed")


def frozen_kv_cache(
    model: HookedTransformer,
    prefix_k: Mapping[int, Float[Tensor, "batch prefix kv_heads d_head"]],
    prefix_v: Mapping[int, Float[Tensor, "batch prefix kv_heads d_head"]],
    layer: int,
    copies: int = 1,
    stop_at_layer: int | None = None,
):
    """A frozen TransformerLens key/value cache holding each layer's keys and values of the first
    positions (``prefix_k[l]``, ``prefix_v[l]``: ``hook_k`` / ``hook_v`` activations ``[batch, P, heads,
    d_head]``), repeated ``copies`` times along the batch, for layers ``layer .. stop_at_layer - 1``
    (default: to the last layer; layers outside are not run). Frozen: forward passes read it and never
    append to it. ``P`` may be 0."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    stop = model.cfg.n_layers if stop_at_layer is None else stop_at_layer
    entries = [
        None if not layer <= l < stop else TransformerLensKeyValueCacheEntry(
            prefix_k[l].repeat(copies, 1, 1, 1), prefix_v[l].repeat(copies, 1, 1, 1), frozen=True)
        for l in range(model.cfg.n_layers)
    ]
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=torch.empty(0), frozen=True)


def forward_from_layer(
    model: HookedTransformer,
    resid: Float[Tensor, "batch pos d_model"],
    layer: int,
    *,
    stop_at_layer: int | None = None,
    kv_cache=None,
    attention_mask: Int[Tensor, "batch slots"] | None = None,
    shortformer_pos_embed: Float[Tensor, "batch pos d_model"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """Run blocks ``layer .. stop_at_layer - 1`` (default: to the last block) on the residual stream
    ``resid`` and return the residual stream after them (no final normalisation: read logits out with
    :func:`circuitlib.interventions.readout`).

    ``kv_cache``: earlier positions as cached keys/values (:func:`frozen_kv_cache`); ``attention_mask``
    ``[batch, cached + pos]`` then says which cached slots each row attends to, and rotary positions
    count only attended slots. Shortformer models need ``shortformer_pos_embed`` (each slot's
    positional embedding): without it their attention would run with no positions at all."""
    if shortformer(model) and shortformer_pos_embed is None:
        raise ValueError("a shortformer model restarted at a later block needs shortformer_pos_embed "
                         "(its positions enter every block's queries and keys)")
    stop = model.cfg.n_layers if stop_at_layer is None else stop_at_layer
    return model(resid, start_at_layer=layer, stop_at_layer=stop, past_kv_cache=kv_cache,
                 attention_mask=attention_mask, shortformer_pos_embed=shortformer_pos_embed)


# ---------------------------------------------------------------------------------------------
# Grouped-query attention


def n_value_groups(model: HookedTransformer) -> int:
    """Key/value heads per layer (``n_heads`` without grouped-query attention)."""
    return model.cfg.n_key_value_heads or model.cfg.n_heads


def value_group(model: HookedTransformer, head: int) -> int:
    """The key/value head that query head ``head`` reads (itself without grouped-query attention):
    ``head // (n_heads / n_key_value_heads)``, as TransformerLens repeats groups and as the MAPS
    authors' ``get_w_vo`` picks them."""
    return head // (model.cfg.n_heads // n_value_groups(model))


def head_W_V(model: HookedTransformer, layer: int) -> Float[Tensor, "n_heads d_model d_head"]:
    """Each query head's value matrix in ``layer`` (grouped-query attention: its group's ``W_V``; the
    weights as stored, no bias)."""
    return model.blocks[layer].attn.W_V  # TransformerLens's W_V property repeats each group's _W_V


def head_W_O(model: HookedTransformer, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """Each head's output matrix in ``layer``."""
    return model.blocks[layer].attn.W_O


def per_query_head(
    model: HookedTransformer, x: Float[Tensor, "*lead kv_heads d_head"]
) -> Float[Tensor, "*lead n_heads d_head"]:
    """``hook_k`` / ``hook_v`` activations (one vector per key/value group) as one vector per query
    head (each head gets its group's); unchanged without grouped-query attention."""
    groups = x.shape[-2]
    if groups == model.cfg.n_heads:
        return x
    return x.repeat_interleave(model.cfg.n_heads // groups, dim=-2)


@contextlib.contextmanager
def kv_per_query_head(model: HookedTransformer, enabled: bool = True) -> Iterator[None]:
    """Within the block, grouped-query attention computes keys and values per query head (each from
    its group's weights), so ``hook_k`` / ``hook_v`` have one vector per query head and a hook can
    change one head's keys or values without touching the rest of its group. The numbers are the same
    (TransformerLens's ``ungroup_grouped_query_attention``); restored on exit, exceptions included."""
    if not enabled or model.cfg.n_key_value_heads is None or model.cfg.ungroup_grouped_query_attention:
        yield
        return
    model.cfg.ungroup_grouped_query_attention = True
    try:
        yield
    finally:
        model.cfg.ungroup_grouped_query_attention = False


# ---------------------------------------------------------------------------------------------
# MAPS inputs


@torch.no_grad()
def maps_first_mlp(model: HookedTransformer, emb: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
    """Block 0's MLP output on ``emb`` after block 0's second normalisation, ``MLP_0(LN2_0(emb))``:
    the MLP alone, without the attention or the residual (the MAPS authors' ``first_mlp``, the same
    call for sequential and parallel-attention blocks). Needs a model with MLPs (:func:`has_mlps`)."""
    if not has_mlps(model):
        raise ValueError("this model is attention-only: it has no first MLP (MAPS uses W_E[s] at every layer)")
    block = model.blocks[0]
    return block.mlp(block.ln2(emb[None]))[0]
