"""The one place that changes attention heads during a forward pass, and reads the result out.

(Being filled in: ``readout`` is shared with :mod:`circuitlib.patching`.)
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def readout(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from final-position residual vectors: the final LayerNorm when the model has one, the
    unembedding (with its bias), and the logit soft-cap when the config sets one (Gemma 2 style).
    Accepts any leading shape."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    lead = resid.shape[:-1]
    x = resid.reshape(-1, 1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)[:, 0]
    return logits.reshape(*lead, logits.shape[-1])
