"""Write the embedded model's card: ``python -m circuitlib.toy.card`` -> ``checkpoint/MODEL_CARD.md``.

The card states the training data and recipe, held-out accuracies per task (and per capital template),
and which heads matter for each task — from circuit discovery (activation patching) and MAPS scores —
so a reader knows what the notebooks will find before running them.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import torch
from transformer_lens import HookedTransformer

from ..causal import top_vs_random
from ..metrics import evaluate
from ..models import TOY_DIR, load_model, model_identity
from ..patching import act_patch_heads
from ..tasks import CAPITAL_TEMPLATES, capital_batch, ioi_batch
from ..tasks.capitals import country_capital_pairs
from ..tasks.copying import copy_names
from ..tasks.ioi import TEMPLATES
from .corpus import MIX

N_EVAL = 200


def card_numbers(model: HookedTransformer) -> dict:
    """Held-out accuracies, logit differences and the top-3 vs random ablation (``N_EVAL`` prompts
    per task, seed 1)."""
    tok = model.tokenizer
    batches = {"ioi": ioi_batch(tok, N_EVAL, seed=1), "capitals": capital_batch(tok, N_EVAL, seed=1)}
    tasks = {task: evaluate(model, batch) for task, batch in batches.items()}
    per_template = {
        t: evaluate(model, capital_batch(tok, 60, templates=[t], seed=1))["accuracy"] for t in CAPITAL_TEMPLATES
    }
    ablation = {task: top_vs_random(model, batch, act_patch_heads(model, batch, direction="noising").top(3)).to_dict()
                for task, batch in batches.items()}
    return {"tasks": tasks, "capital_templates": per_template, "ablation": ablation}


def heads_section(model: HookedTransformer) -> tuple[list[str], dict]:
    """Circuit discovery and MAPS results for both tasks (markdown lines, JSON)."""
    from ..circuits import discover_circuit
    from ..scoring import static_scores

    lines, data = [], {}
    relation = {"ioi": "name_copying", "capitals": "country_to_capital_wikidata"}
    for task in ("ioi", "capitals"):
        found = discover_circuit(model, task)
        circuit = found.circuit
        maps = static_scores(model, relation[task])
        top_maps = maps.top(3)
        patch = found.scores["act_patch"]
        held = ", ".join(f"{name} {f.faithfulness:.2f}" for name, f in found.heldout.items())
        word = "circuit" if found.is_robust else "head set (not called a circuit: fewer than two conventions reach 0.85)"
        lines += [
            f"- **{task}**: {word} {', '.join(circuit.names())} ({circuit.how}; faithfulness on the selection "
            f"prompts {found.selection.faithfulness:.2f}; held-out under each ablation convention: {held}). "
            "Largest activation-patching effects: "
            + ", ".join(f"{l}.{h} ({patch[(l, h)]:.2f})" for l, h in patch.top(4, absolute=True))
            + f". Top MAPS `{relation[task]}` heads (k={maps.k}): "
            + ", ".join(f"{l}.{h} ({maps[(l, h)]:.2f})" for l, h in top_maps) + ".",
        ]
        data[task] = {"circuit": circuit.names(), "robust": found.robust, "maps_top": [f"{l}.{h}" for l, h in top_maps]}
    return lines, data


def render(model: HookedTransformer, numbers: dict, heads_lines: list[str]) -> str:
    from ..interventions import live_heads

    ident = model_identity(model)
    live = live_heads(model)
    ov = torch.einsum("lhde,lhem->lhdm", model.W_V, model.W_O).flatten(-2).norm(dim=-1).detach()
    live_txt = ", ".join(f"{l}.{h} ({ov[l, h]:.3f})" for l, h in live)
    n_heads = ident["n_layers"] * ident["n_heads"]
    meta = json.loads((TOY_DIR / "config.json").read_text())
    training = meta.get("training", {})
    size_kb = (TOY_DIR / "model.safetensors").stat().st_size // 1024
    t = numbers["tasks"]
    rows = "\n".join(
        f"| {name} | {r['accuracy']:.3f} | {r['top1_accuracy']:.3f} | {r['logit_diff']:.2f} | {r['corrupt_logit_diff']:.2f} |"
        for name, r in t.items()
    )
    def drop(r: dict, key: str) -> str:  # no control set (too few live heads): no random drop to show
        return f"{r['drop_random'][key]:.3f}" if r["drop_random"] else "—"

    numbers_rows = "\n".join(
        f"| {task} | {', '.join(r['heads'])} | {r['clean']['top1_accuracy']:.2f} -> {r['top']['top1_accuracy']:.2f} "
        f"| {drop(r, 'top1_accuracy')} | {r['clean']['accuracy']:.2f} -> {r['top']['accuracy']:.2f} "
        f"(binomial p above chance {r['binomial_p_above_chance']:.2f}) | {drop(r, 'accuracy')} "
        f"| {r['n_random']} ({r['random_how']}) |"
        for task, r in numbers["ablation"].items()
    )
    n_live = len(live)
    hit = 1 - math.comb(n_live - 3, 3) / math.comb(n_live, 3) if n_live >= 3 else 1.0
    hit_frac = Fraction(hit).limit_denominator(1000)
    n_sets = math.comb(max(n_live - 3, 0), 3)
    templ = "\n".join(f"| `{k}` | {v:.3f} |" for k, v in numbers["capital_templates"].items())
    mix = ", ".join(f"{k} {int(v * 100)}%" for k, v in MIX.items())
    return f"""# Model card: circuitlib's embedded model (`toy`)

A GPT-2-architecture transformer trained by circuitlib on synthetic text, so that every notebook and
test runs offline in seconds. Regenerate this card with `python -m circuitlib.toy.card`.

## Architecture
{ident['n_layers']} layers x {ident['n_heads']} heads, d_model {ident['d_model']}, d_head {model.cfg.d_head}, context 32,
**attention-only** (LayerNorm before each attention layer and before the unembedding; no MLPs), learned
positional embeddings, untied embedding / unembedding; {ident['n_params']:,} parameters,
`model.safetensors` {size_kb} KB. Word-level tokenizer of {ident['d_vocab']} tokens (`tokenizer.json`):
every name, country, capital and template word is one token; punctuation is split off;
`<|endoftext|>` is BOS / EOS / PAD. Attention-only is deliberate: with MLPs the capital facts are stored
in the MLP and no head's OV circuit carries them, so MAPS would have nothing to find.

## Training data and recipe
Generated by `circuitlib/toy/corpus.py` (seed {training.get('seed', 0)}): {mix}.
- IOI: the 30 templates of Wang et al. (2022) with {len(copy_names())} single-token names (the IOI names plus
  the one-word names of MAPS's `name_copying` relation), 8 places, 8 objects; the sentence ends with the IO name.
  {len(TEMPLATES)} templates x names: one (template, IO name) combination in five is held out (CRC32) and never generated.
- Capitals: the {len(country_capital_pairs())} one-word
  (country, capital) pairs of MAPS's `country_to_capital_wikidata`, in {len(CAPITAL_TEMPLATES)} templates; each
  country's fifth template is held out.
- Copying: a 2-5 word list repeated after a comma. Filler: "This is a document about X", "N likes the PLACE", ...

Recipe (`python -m circuitlib.toy.train`): {training.get('steps')} steps of AdamW (lr 2e-3 one-cycle, no weight
decay, batch 128), next-token loss on every position with the answer token weighted 5x, plus a head
group-lasso {training.get('head_l1')} x sum over heads of (||W_V||_F + ||W_O||_F) that switches unneeded heads off
(without it, each task was spread over nearly all 24 heads and no few heads mattered); final loss
{training.get('final_loss')}; {training.get('train_seconds')} s ({training.get('note', '2 CPU cores')}).

## Held-out accuracy
Prompts whose (template, name) or (country, template) combination never occurred in training, {N_EVAL} per task.
Accuracy = answer logit beats the wrong answer (IOI: IO vs S; capitals: the capital vs the corrupt
country's capital); top-1 = answer is the argmax over the vocabulary.

| task | accuracy | top-1 | logit diff | logit diff (corrupted) |
|---|---|---|---|---|
{rows}

Capitals per template (60 prompts each, seen and unseen combinations):

| template | accuracy |
|---|---|
{templ}

## Which heads matter
From `circuitlib.circuits.discover_circuit` (activation patching, noising, normalised logit difference)
and `circuitlib.scoring.static_scores` (MAPS, unprocessed weights, raw embeddings as inputs — the model
has no MLP):

{chr(10).join(heads_lines)}

Live heads (OV weight norm ||W_V W_O||_F at least 1e-3 of the largest head's, `circuitlib.interventions.live_heads`;
the group-lasso leaves the others at ~1e-12): **{len(live)} of {n_heads}**: {live_txt}. Mechanisms vary with the
training seed; tests assert properties (floors, a MAPS-visible capital head among the important ones), not these indices.

What {n_live} live heads let a random-head control show: random sets are drawn only from the live heads outside
the heads under test, layer-matched where the layers allow, else size-matched
(`circuitlib.interventions.control_sets`). Drawn from all {n_live} live heads, a random 3 would contain one of
a task's top 3 in {hit_frac.numerator} of {hit_frac.denominator} draws, so the heads under test are excluded; that
leaves {n_live - 3} live heads and {n_sets} {'set' if n_sets == 1 else 'sets'} of 3, so a "random heads cost little" result is an
exhaustive statement about those few sets, not a sample, and a p-value against them cannot go below
1/(number of sets + 1). Switched-off heads are never used to fill a set: drawn from all {n_heads} heads, random sets
would be almost always dead heads and "random heads change nothing" would be forced. When too few live heads
remain for one set, there is no control and no p-value.

## Ablation floor
The 3 heads with the largest activation-patching effect, mean-ablated at every position (means over the
corrupted prompts, BOS excluded), against every set (or 2,000 draws) of 3 live heads outside them, {N_EVAL}
held-out prompts per task. `tests/test_toy.py` asserts, once and for every checkpoint: top-1 accuracy drops by
>= 0.5; the random sets cost < 0.1 on average (top-1 and two-way); and after ablating the top 3 the two-way
accuracy (chance 0.5) is not above chance (one-sided exact binomial test, p >= 0.05).

| task | top-3 heads | top-1: clean -> top-3 ablated | top-1: mean drop, random sets | two-way: clean -> top-3 ablated | two-way: mean drop, random sets | random sets |
|---|---|---|---|---|---|---|
{numbers_rows}
"""


def main() -> None:
    model = load_model("toy")
    numbers = card_numbers(model)
    try:
        lines, heads = heads_section(model)
    except ImportError:
        lines, heads = ["(circuit discovery not available)"], {}
    (TOY_DIR / "MODEL_CARD.md").write_text(render(model, numbers, lines))
    print(json.dumps({"numbers": numbers, "heads": heads}, indent=1, default=float))


if __name__ == "__main__":
    main()
