"""Relation prompts for MAPS's causal check (experiment 2 of Elhelo & Geva 2024).

The MAPS authors prompt each relation with one fixed template (their ``experiment2_causal.py``), fill
it with every single-token source (``" " + word``, MAPS's filter), and read the next token at the last
position; the answer is the target's single token (with its leading space). Their GPT-2 / Pythia
pipeline prepends no BOS (the tokenizer adds none); circuitlib decides BOS as for the dynamic scores
(:func:`circuitlib.scoring.dynamic_bos`): none for GPT-2-style architectures, BOS where the tokenizer
adds one, and BOS for the embedded model, which never saw a sequence without one.

A model whose tokenizer cannot spell a relation's template (the embedded model's word-level
vocabulary has no ``->`` or ``;``) gets the task registered for that relation instead
(:data:`circuitlib.tasks.TASK_SPECS`, e.g. name copying -> the ``copying`` task); the causal check
says which prompts it used.

For the two-way accuracy circuitlib adds a wrong answer per prompt: the target of another pair (a
seeded derangement over pairs with a different target), with that pair's source in the corrupted
prompt.
"""

from __future__ import annotations

import numpy as np
import torch

from ..types import TaskBatch
from .relations import load_relation

#: One template per relation, as the MAPS authors' experiment 2 uses them ("<X>" = the source word).
MAPS_CAUSAL_TEMPLATES: dict[str, str] = {
    "country_to_capital_wikidata": "The capital of <X> is",
    "country_to_official_language_wikidata": "The official language of <X> is",
    "product_by_company": "Nesquik is made by Nestlé; Mustang is made by Ford; <X> is made by",
    "object_superclass": "A <X> is a kind of",
    "adj_comparative": " lovely-> lovelier; edgy-> edgier; <X>->",
    "verb_past_tense": " hike->hiked; purchase-> purchased; <X>->",
    "word_first_letter": " word-> w, o, r, d; cat-> c, a, t; <X>->",
    "word_last_letter": " word-> d, r, o, w; cat-> t, a, c; <X>->",
    "year_to_following": " 1300-> 1301; 1000-> 1001; <X>->",
    "general_copying_english_500": " walk-> walk; cat-> cat; water-> water; <X>->",
    "name_copying": " John-> John; Donna-> Donna; <X>->",
    "entity_to_pronoun": " mother-> she; father-> he; tribe-> they; actress-> she; apartment-> it; <X>->",
    "english_to_spanish": " apartment-> departamento; computer-> computadora; tribe-> tribu; <X>->",
}


def template_fits(tokenizer, relation: str) -> bool:
    """Whether ``tokenizer`` spells the relation's MAPS template without unknown tokens."""
    from ..scoring import template_fits as fits

    return relation in MAPS_CAUSAL_TEMPLATES and fits(tokenizer, MAPS_CAUSAL_TEMPLATES[relation])


def _different_target_pairing(tgt: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    """``other[i]`` != i with ``tgt[other[i]] != tgt[i]`` for every i: prompts sorted by target (random
    order inside each target), each paired with the prompt ``m`` places further on, ``m`` = the size of the
    largest target group (so a pair never shares its target). Impossible when one target covers more
    than half of the prompts: then a ValueError."""
    n = len(tgt)
    values, counts = np.unique(tgt.numpy(), return_counts=True)
    m = int(counts.max())
    if 2 * m > n:
        raise ValueError(f"{m} of {n} prompts share one target ({int(values[counts.argmax()])}): no wrong answer "
                         "with another target can be drawn for each (two-way accuracy undefined)")
    order = np.lexsort((rng.random(n), tgt.numpy()))
    other = np.empty(n, dtype=np.int64)
    other[order] = order[(np.arange(n) + m) % n]
    return other


def relation_prompt_batch(
    relation: str, tokenizer, *, bos: bool, n: int | None = None, seed: int = 0, model_name: str = ""
) -> TaskBatch:
    """MAPS's causal-check prompts for ``relation`` as a :class:`TaskBatch` (every single-token pair,
    or ``n`` of them drawn with ``seed``). ``bos``: prepend BOS (decide it with
    :func:`circuitlib.scoring.dynamic_bos`, as the dynamic scores do).

    Positions: ``SRC`` (the source token) and ``END`` (last token). ``answer``: the target token;
    ``wrong`` / ``corrupt``: another pair's target / prompt (see the module docstring).
    """
    if relation not in MAPS_CAUSAL_TEMPLATES:
        raise ValueError(f"MAPS's causal check has no template for {relation!r}; it covers "
                         f"{', '.join(sorted(MAPS_CAUSAL_TEMPLATES))}")
    if not template_fits(tokenizer, relation):
        raise ValueError(f"this tokenizer cannot spell the {relation} template "
                         f"{MAPS_CAUSAL_TEMPLATES[relation]!r} (unknown tokens); use the relation's task instead")
    template = MAPS_CAUSAL_TEMPLATES[relation]
    pairs = load_relation(relation, tokenizer)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(pairs)) if n is None or n >= len(pairs) else np.sort(rng.choice(len(pairs), n, replace=False))
    tgt = pairs.tgt[idx]
    if len(set(tgt.tolist())) < 2:
        raise ValueError(f"{relation} has fewer than two distinct targets; no wrong answer can be drawn")
    other = _different_target_pairing(tgt, rng)
    prefix = [int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)] if bos else []

    def encode(word: str) -> list[int]:
        return prefix + list(tokenizer.encode(template.replace("<X>", word), add_special_tokens=False))

    clean = [encode(pairs.src_words[i]) for i in idx]
    corrupt = [encode(pairs.src_words[idx[j]]) for j in other]
    lengths = {len(c) for c in clean + corrupt}
    if len(lengths) != 1:
        raise ValueError(f"{relation} prompts tokenize to different lengths {sorted(lengths)}; MAPS batches them "
                         "unpadded, so every source must be one token inside the template")
    src_pos = []
    for c, i in zip(clean, idx):
        where = [p for p, t in enumerate(c) if t == int(pairs.src[i])]
        src_pos.append(where[-1] if where else len(c) - 2)
    S = lengths.pop()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix[0] if prefix else 0
    return TaskBatch(
        task=f"maps:{relation}",
        clean=torch.tensor(clean),
        corrupt=torch.tensor(corrupt),
        answer=tgt.clone(),
        wrong=tgt[other].clone(),
        positions={"SRC": torch.tensor(src_pos), "END": torch.full((len(idx),), S - 1)},
        prompts=[template.replace("<X>", pairs.src_words[i]) for i in idx],
        corrupt_prompts=[template.replace("<X>", pairs.src_words[idx[j]]) for j in other],
        pad_id=int(pad),
        meta={"model": model_name, "template": template, "bos": bos, "relation": relation,
              "source": "MAPS experiment 2 template"},
    )
