"""Task metrics read at each prompt's final position (``batch.positions["END"]``).

- logit difference = logit(answer) - logit(wrong answer), at END;
- accuracy = fraction of prompts where the answer's logit beats the wrong answer's (IOI: IO beats S);
- top-1 accuracy = fraction where the answer is the argmax over the whole vocabulary;
- normalised metric: ``(m - m_corrupt) / (m_clean - m_corrupt)``, so 1 = clean, 0 = corrupted.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .types import TaskBatch

#: Logits a metric reads: a forward pass's ``[batch, seq, vocab]``, or the END logits ``[batch, vocab]``.
Logits = Float[Tensor, "batch seq vocab"] | Float[Tensor, "batch vocab"]
#: A metric value: a float, or a float tensor of any shape (a scalar mean, per-prompt ``[batch]``, per head ...).
Metric = Float[Tensor, "..."] | float


def end_logits(logits: Logits, batch: TaskBatch) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's END position (accepts ``[batch, vocab]`` unchanged)."""
    if logits.ndim == 2:
        return logits
    return logits[torch.arange(logits.shape[0]), batch.end.to(logits.device)]


def logit_diff(
    logits: Logits, batch: TaskBatch, *, per_prompt: bool = False
) -> Float[Tensor, ""] | Float[Tensor, " batch"]:
    """logit(answer) - logit(wrong) at END; the mean over prompts unless ``per_prompt``."""
    last = end_logits(logits, batch)
    rows = torch.arange(last.shape[0])
    diff = last[rows, batch.answer.to(last.device)] - last[rows, batch.wrong.to(last.device)]
    return diff if per_prompt else diff.mean()


def accuracy(logits: Logits, batch: TaskBatch) -> float:
    """Fraction of prompts whose answer logit beats the wrong answer's logit at END."""
    return float((logit_diff(logits, batch, per_prompt=True) > 0).float().mean())


def top1_accuracy(logits: Logits, batch: TaskBatch) -> float:
    """Fraction of prompts whose answer is the vocabulary argmax at END."""
    last = end_logits(logits, batch)
    return float((last.argmax(-1) == batch.answer.to(last.device)).float().mean())


SPAN_TOL = 1e-6  # clean and corrupt metrics closer than this count as equal (float32 noise)


def check_span(clean: Metric, corrupt: Metric) -> None:
    """Raise one clear ``ValueError`` when the clean and corrupt metrics are equal (within ``SPAN_TOL``):
    the normalised metric ``(m - m_corrupt) / (m_clean - m_corrupt)`` is then undefined."""
    span = torch.as_tensor(clean, dtype=torch.float64) - torch.as_tensor(corrupt, dtype=torch.float64)
    if bool((span.abs() < SPAN_TOL).any()):
        raise ValueError(
            f"the clean and corrupt metrics are equal (clean={_show(clean)}, corrupt={_show(corrupt)}), so "
            "the normalised metric (m - corrupt) / (clean - corrupt) is undefined: use a corruption that "
            "changes the answer (e.g. IOI's 'ABC' or 'flip', another country for capitals), check that "
            "answer and wrong answer differ, or use an unnormalised metric ('accuracy' or a callable)"
        )


def _show(x: Metric) -> str:
    x = torch.as_tensor(x)
    return f"{float(x):.6g}" if x.numel() == 1 else f"tensor of shape {tuple(x.shape)}"


def normalise(value: Metric, clean: Metric, corrupt: Metric) -> Metric:
    """Map a metric so that the clean run gives 1 and the corrupted run gives 0 (elementwise, broadcasting:
    e.g. per-prompt values ``[batch]`` against scalar clean / corrupt means).

    Raises ``ValueError`` when ``clean`` equals ``corrupt`` (the map is undefined)."""
    check_span(clean, corrupt)
    return (value - corrupt) / (clean - corrupt)


@torch.no_grad()
def evaluate(model: HookedTransformer, batch: TaskBatch) -> dict[str, float]:
    """Clean accuracy, top-1 accuracy and mean logit difference; the same on the corrupted prompts."""
    clean = model(batch.clean.to(model.cfg.device))
    corrupt = model(batch.corrupt.to(model.cfg.device))
    return {
        "accuracy": accuracy(clean, batch),
        "top1_accuracy": top1_accuracy(clean, batch),
        "logit_diff": float(logit_diff(clean, batch)),
        "corrupt_logit_diff": float(logit_diff(corrupt, batch)),
        "n_prompts": len(batch),
    }
