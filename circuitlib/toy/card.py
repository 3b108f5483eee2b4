"""Write the embedded model's card: ``python -m circuitlib.toy.card [--floors JSON] [--replicate JSON ...]``
-> ``checkpoint/MODEL_CARD.md``.

The card is generated from :func:`circuitlib.toy.floors.floors` (the issue-13 floors: held-out accuracy,
live heads and their criterion, each task's top-3 heads against random 3-sets of the other live heads,
MAPS capital heads and whether they are causal, the IOI roles from path patching) on the shipped
checkpoint, plus the recipe it was trained with, per-template capital accuracy and circuit discovery for
every report task. ``--floors`` reuses a stored floors result of the same weights (checked by SHA-256)
instead of recomputing it (~10 minutes); each ``--replicate`` is the ``floors.json`` of a checkpoint
retrained with the same recipe and another seed, shown as one row of the seeds table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformer_lens import HookedTransformer

from ..metrics import evaluate
from ..models import TOY_DIR, load_model, model_identity
from ..tasks import CAPITAL_TEMPLATES, TASK_SPECS, capital_batch, report_tasks
from ..tasks.capitals import country_capital_pairs
from ..tasks.colored_objects import COLORED_TEMPLATES, COLORS, ITEMS, SURFACES
from ..tasks.copying import copy_names
from ..tasks.ioi import TEMPLATES
from . import floors as fl
from .corpus import MIX


def capital_templates(model: HookedTransformer) -> dict[str, float]:
    """Capital accuracy per template (60 prompts each, seed 1; custom template lists mix seen and unseen)."""
    return {t: evaluate(model, capital_batch(model.tokenizer, 60, templates=[t], seed=1))["accuracy"]
            for t in CAPITAL_TEMPLATES}


def heads_section(model: HookedTransformer) -> tuple[list[str], dict]:
    """Circuit discovery (and MAPS, for tasks with a relation) for every report task (markdown lines, JSON)."""
    from ..circuits import discover_circuit
    from ..scoring import static_scores

    lines, data = [], {}
    for task in report_tasks():
        found = discover_circuit(model, task)
        circuit = found.circuit
        patch = found.scores["act_patch"]
        held = ", ".join(f"{name} {f.faithfulness:.2f}" for name, f in found.heldout.items())
        word = "circuit" if found.is_robust else "head set (not called a circuit: fewer than two conventions reach 0.85)"
        text = (f"- **{TASK_SPECS[task].title}**: {word} {', '.join(circuit.names())} ({circuit.how}; faithfulness on "
                f"the selection prompts {found.selection.faithfulness:.2f}; held-out under each ablation convention: "
                f"{held}). Largest activation-patching effects: "
                + ", ".join(f"{l}.{h} ({patch[(l, h)]:.2f})" for l, h in patch.top(4, absolute=True)) + ".")
        relation = TASK_SPECS[task].relation
        data[task] = {"circuit": circuit.names(), "robust": found.robust}
        if relation:
            maps = static_scores(model, relation)
            top = maps.top(3)
            text += f" Top MAPS `{relation}` heads (k={maps.k}): " + ", ".join(f"{l}.{h} ({maps[(l, h)]:.2f})"
                                                                             for l, h in top) + "."
            data[task]["maps_top"] = [f"{l}.{h}" for l, h in top]
        else:
            text += " (No MAPS relation: none of MAPS's relation sets is an object -> colour table.)"
        lines.append(text)
    return lines, data


def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _heads(d: dict) -> str:
    return ", ".join(f"{h} ({v:.2f})" for h, v in d.items()) or "none"


FLOOR_TEXT = {
    "heldout_accuracy>=0.95": "held-out accuracy >= 0.95 on IOI, Colored Objects and capitals",
    "checkpoint<10MB": "checkpoint < 10 MB",
    "retraining<=30min": "retraining <= 30 min (CPU seconds of the training process)",
    "live_heads>=12": ">= 12 live heads",
    "top3_drop_top1>=0.5": "every task's top-3 heads drop its top-1 accuracy by >= 0.5",
    "random3_drop_top1<0.1": "3-sets of the other live heads cost < 0.1 top-1 accuracy on average, every task",
    "ioi_two_roles": "IOI heads in >= 2 roles by path patching (movers, S-inhibition-like)",
    "movers_copy_names(MAPS>=0.5)": "IOI movers score >= 0.5 on MAPS name copying",
    "capital_heads(MAPS>=0.5)_causal": "heads with MAPS capital score >= 0.5 carry the capital task "
                                       "(ablated together: top-1 drop >= 0.5)",
}


def _order(d: dict) -> list[str]:
    """``d``'s task keys in registry order (report tasks first, then the others as they come)."""
    return [t for t in report_tasks() if t in d] + [t for t in d if t not in report_tasks()]


def _seed_row(r: dict) -> str:
    tr, a, t = r["training"], r["ablation"], r["tasks"]
    met = [k for k, ok in r["floors"].items() if ok]
    order = _order({k: None for k in fl.FLOOR_TASKS})
    return (f"| {tr.get('seed')} | " + " / ".join(f"{t[k]['accuracy']:.2f}" for k in order) + f" | {r['live']['n']} | "
            + " / ".join(_f(a[k]["drop_top1"]) for k in order) + " | "
            + " / ".join(_f(a[k]["random_drop_top1"]) for k in order) + " | "
            + f"{', '.join(r['maps']['capital_heads_causal']) or '—'} | {', '.join(r['ioi_roles']['movers']) or '—'} | "
            + f"{', '.join(r['ioi_roles']['s_inhibition']) or '—'} | {len(met)} of {len(r['floors'])}"
            + ("" if len(met) == len(r["floors"]) else f" (not: {', '.join(k for k, ok in r['floors'].items() if not ok)})")
            + " |")


def render(model: HookedTransformer, res: dict, templ: dict[str, float], heads_lines: list[str],
           replicates: list[dict] = ()) -> str:
    """The card's markdown from a floors result (``Floors.to_dict()``) and the extra numbers."""
    ident = model_identity(model)
    n_heads = ident["n_layers"] * ident["n_heads"]
    tr = res["training"]
    mix = tr.get("mix") or MIX
    mix_txt = ", ".join(f"{k} {v:.0%}" for k, v in mix.items())
    arch = ("**attention-only** (LayerNorm before each attention layer and before the unembedding; no MLPs)"
            if ident["attn_only"] else
            f"MLPs (d_mlp {tr.get('d_mlp')}) in block(s) {tr.get('mlp_layers') or 'all'}"
            + ("; the other blocks' MLPs are zeroed and frozen" if tr.get("mlp_layers") else ""))
    task_rows = "\n".join(
        f"| {TASK_SPECS[t].title if t in TASK_SPECS else t} | {r['accuracy']:.3f} | {r['top1_accuracy']:.3f} | "
        f"{r['logit_diff']:.2f} | {r['corrupt_logit_diff']:.2f} |" for t, r in ((t, res["tasks"][t]) for t in _order(res["tasks"])))
    lv = res["live"]
    floor_order = _order({k: None for k in fl.FLOOR_TASKS})
    rel_rows = "\n".join(
        f"| {h} | " + " | ".join(_f(lv["rel_change"][t].get(h)) for t in (*floor_order, "copying")) + " |"
        for h in lv["heads"])
    abl_rows = "\n".join(
        f"| {TASK_SPECS[t].title if t in TASK_SPECS else t} | {', '.join(a['top3'])} | {a['clean_top1']:.2f} -> "
        f"{a['top3_top1']:.2f} (drop {a['drop_top1']:.2f}) | {_f(a['random_drop_top1'], 3)} "
        f"(worst {_f(a['random_worst_drop_top1'])}) | {a['clean_acc']:.2f} -> {a['top3_acc']:.2f} | "
        f"{_f(a['random_drop_acc'], 3)} | {a['n_draws']} of {len(a['pool'])} heads |"
        for t, a in ((t, res["ablation"][t]) for t in floor_order))
    m, roles = res["maps"], res["ioi_roles"]
    floor_rows = "\n".join(f"| {FLOOR_TEXT.get(k, k)} | {'yes' if ok else '**no**'} |" for k, ok in res["floors"].items())
    recipe = "\n".join(f"| `{k}` | {json.dumps(v)} |" for k, v in tr.items() if k not in ("command",))
    seeds = [res, *replicates]
    seed_rows = "\n".join(_seed_row(r) for r in seeds)
    templ_rows = "\n".join(f"| `{k}` | {v:.3f} |" for k, v in templ.items())
    movers = ", ".join(f"{h} (attention END -> IO {v[0]:.2f}, -> S2 {v[1]:.2f}; MAPS name copying "
                       f"{roles['mover_name_copying'][h]:.2f})" for h, v in roles["mover_attention_IO_S2"].items()) or "none"
    inhib = ", ".join(f"{h} (attention END -> S2 {v[0]:.2f}, -> IO {v[1]:.2f})"
                      for h, v in roles["s_inhibition_attention_S2_IO"].items()) or "none"
    return f"""# Model card: circuitlib's embedded model (`toy`)

A GPT-2-architecture transformer trained by circuitlib on synthetic text, so that every notebook and
test runs offline in seconds. Regenerate this card with `python -m circuitlib.toy.card` (its numbers come
from `python -m circuitlib.toy.floors`, definitions in that module's docstring).

## Architecture
{ident['n_layers']} layers x {ident['n_heads']} heads, d_model {ident['d_model']}, d_head {model.cfg.d_head},
context {model.cfg.n_ctx}, {arch}, learned positional embeddings, untied embedding / unembedding;
{ident['n_params']:,} parameters, `model.safetensors` {res['size_mb']} MB (SHA-256 `{res['weights_sha256'][:16]}…`).
Word-level tokenizer of {ident['d_vocab']} tokens (`tokenizer.json`): every name, country, capital, colour,
object, surface and template word is one token; punctuation is split off; `<|endoftext|>` is BOS / EOS / PAD.

## Training data and recipe
Generated by `circuitlib/toy/corpus.py` (seed {tr.get('seed', 0)}): {mix_txt}.
- IOI: the 30 templates of Wang et al. (2022) with {len(copy_names())} single-token names (the IOI names plus
  the one-word names of MAPS's `name_copying` relation), 8 places, 8 objects; the sentence ends with the IO name.
  {len(TEMPLATES)} templates x names: one (template, IO name) combination in five is held out (CRC32) and never generated.
- Colored Objects (Merullo et al. 2024): {len(COLORED_TEMPLATES)} templates, {len(COLORS)} colours, {len(ITEMS)} objects,
  {len(SURFACES)} surfaces; three (colour, object) pairs and a question about one object, answered by its colour.
  Each template has one surface it is never trained with (the held-out split); colours, objects and the queried
  position are not in the key, so every object-colour pair is trained in every position and neither
  object -> colour nor position statistics can help on the held-out split.
- Curriculum for Colored Objects (`STAGES` in `circuitlib/toy/corpus.py`, run before the main steps): five
  stages, each on its own mix, each ending when the last-token top-1 accuracy on 128 unseen sentences of its
  gate kind reaches a threshold (checked every 50 steps) or at a step cap. They move the queried object away
  from its answer one token at a time: `lookup0` ("red pen blue cup : cup blue pen red", the lookup at the object
  itself), then `gap1` / `gap2` / `gap3` (1-3 tokens between the queried object and its colour: "red pen blue cup
  : cup ? Answer : blue"), then Colored Objects itself; IOI sentences are in every stage. The main mix adds
  `lookup` sentences (a Colored Objects list on a surface no template holds out, then "The cup is blue"). Without
  a curriculum Colored Objects stayed at chance in every run (the model put the three listed colours on top); with
  a fixed-fraction warm-up it formed in one seed of three.
- Capitals: the {len(country_capital_pairs())} one-word (country, capital) pairs of MAPS's
  `country_to_capital_wikidata`, in {len(CAPITAL_TEMPLATES)} templates; each country's fifth template is held out.
- Copying: a 2-5 word list repeated after a comma. Filler: "This is a document about X", "N likes the PLACE", ...

Loss: next-token cross-entropy on every position, the answer token of IOI, Colored Objects and capital
sentences weighted {tr.get('answer_weight', 5)}x, plus a head group-lasso `head_l1` x sum over heads of
(||W_V||_F + ||W_O||_F), off for the first `l1_start` of the main steps and ramped in over `l1_ramp` (none during the stages).
Command: `{tr.get('command', 'python -m circuitlib.toy.train')}`; `torch.use_deterministic_algorithms(True)`.

| recipe (and run) | value |
|---|---|
{recipe}

## Held-out accuracy
{res['n_prompts']} held-out prompts per task (seed {res['seed']}): combinations never generated in training.
Accuracy = answer logit beats the wrong answer (two-way, chance 0.5); top-1 = answer is the argmax.

| task | accuracy | top-1 | logit diff | logit diff (corrupted) |
|---|---|---|---|---|
{task_rows}

Capitals per template (60 prompts each, seen and unseen combinations):

| template | accuracy |
|---|---|
{templ_rows}

## Floors (issue 13)

| floor | met |
|---|---|
{floor_rows}

**Live heads: {lv['n']} of {n_heads}.** Criterion: {lv['criterion']} (mean-ablation: the head's `z`
replaced at every non-BOS position by its mean over the corrupted prompts' real tokens). Counting the copying
task too: {lv['n_incl_copying']}; heads with ||W_V||_F + ||W_O||_F > 0.1: {lv['n_norm_gt_0_1']}. The library's
random-head controls (`circuitlib.interventions.live_heads`, used by the notebooks and the report) count
heads by OV weight norm instead. Relative change of the mean logit difference when the head alone is ablated:

| head | {' | '.join(floor_order)} | copying |
|---|---|---|---|---|
{rel_rows}

**Top-3 heads vs random heads.** Top 3 by activation patching (noising, every position); random: {fl.N_DRAWS}
seeded 3-sets drawn from the live heads outside the task's top 3, mean-ablated the same way; drops are clean
minus ablated.

| task | top-3 heads | top-1: clean -> top 3 ablated | top-1: mean drop, random 3-sets | two-way: clean -> top 3 ablated | two-way: mean drop, random | draws, pool |
|---|---|---|---|---|---|---|
{abl_rows}

**Country -> capital heads (MAPS).** Static scores on `country_to_capital_wikidata` (k=10) >= 0.2:
{_heads(m['capital_scores'])}. At or above 0.5: {', '.join(m['capital_heads']) or 'none'}; among the capital
task's top 3: {', '.join(m['capital_heads_in_top3']) or 'none'}; causal (live on capitals or in its top 3):
{', '.join(m['capital_heads_causal']) or 'none'}; ablating those together takes capital top-1 accuracy to
{_f(m['causal_ablated_top1'])} (drop {_f(m['causal_ablated_drop_top1'])}).

**IOI roles (path patching, noising, ABC corruption).** Path to the logits (normalised logit difference
lost, |score| >= 0.05): {_heads(roles['direct_path'])}. Movers (path to the logits >= {fl.ROLE_T}, attending
more to IO than to S2 from END): {movers}. S-inhibition-like (not movers; path to the movers' queries at END or
keys >= {fl.ROLE_T}): {inhib}. Path to the movers' queries: {_heads(roles['path_to_movers_q'] or {})}; keys:
{_heads(roles['path_to_movers_k'] or {})}.

## Seeds
The shipped checkpoint first, then each retraining of the same recipe with another seed (`--replicate`).
Columns per task in the order {' / '.join(floor_order)}.

| seed | held-out accuracy | live heads | top-3 top-1 drop | random-3 top-1 drop | causal MAPS capital heads | IOI movers | S-inhibition-like | floors met |
|---|---|---|---|---|---|---|---|---|
{seed_rows}

## Which heads matter (circuit discovery)
From `circuitlib.circuits.discover_circuit` (activation patching, noising, normalised logit difference) and,
for tasks with a MAPS relation, `circuitlib.scoring.static_scores`:

{chr(10).join(heads_lines)}

Mechanisms vary with the training seed; tests assert the floors (properties), not these head indices.

## What was tried, and what this model cannot answer
Every attempt, with its floors, is in `docs/exp13/EXPERIMENTS.md` (sessions 3 and 5-8: 4-layer models, penalty
schedules, data mixes, Colored-Objects-heavy mixes, a wider model, fixed and gated curricula, IOI-first
curricula). What follows from the misses above:

- **The recipe, not only the checkpoint.** The gated curriculum learns all three tasks on seeds 0, 1 and 2
  (held-out accuracy >= 0.97 on every task; seeds table), so the CI floors (accuracy, size, retraining time) hold
  for the recipe. The previous checkpoint's recipe (a fixed-fraction warm-up, session 5) learned Colored Objects
  in one seed of three. Its checkpoint met 7 of the 9 floors, one more than this one: it had IOI movers. The
  default seed is 2 because it met the most floors of the three seeds trained (6; seeds 0 and 1 met 5). Missed
  by every seed: random-3, IOI roles, movers' name copying.
- **IOI movers and S-inhibition (GPT-2's roles).** Not in this model. Its IOI heads are 0.2 and 0.5 (layer 0):
  they attend from END to S2 and push the repeated name down (direct path above; they are the model's top MAPS
  name-*suppression* heads), while the heads that bring names to END attend to IO and S1 about equally on average over prompts. The other
  seeds read the other name off S2 instead (gathered there by layer-0 heads). A 3-layer attention-only model has
  these shortcuts because in every IOI sentence the name that differs from S2 is the answer; IOI-first
  curricula formed them at once (EXPERIMENTS.md, session 8). So whether movers score high on MAPS name copying
  (the seed figure's observation) cannot be asked of this model; it is a question for gpt2-medium.
- **Random-head controls.** 3-sets of the other live heads cost IOI and Colored Objects 0.34 and 0.22 top-1
  accuracy on average. On IOI they cost two-way accuracy almost nothing (0.003): the pool holds heads that bring
  both names to END alike, so removing three of them lowers IO and S together. IO still beats S, but it is no
  longer the model's first choice. Single heads of the pool change IOI's logit difference by at most 0.10 of it
  (table above). Colored Objects' circuit is longer than its top 3: 0.4, 0.5 and 0.2 are in the pool, and each
  moves its logit difference by 24-50% alone. "Random heads change nothing" holds for capitals only (0.09).
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write checkpoint/MODEL_CARD.md from the floors of the shipped checkpoint.")
    p.add_argument("--floors", type=Path, default=None,
                   help="a stored floors.json of the shipped weights (else computed, ~10 min)")
    p.add_argument("--replicate", type=Path, nargs="*", default=[],
                   help="floors.json of retrainings with other seeds (one row each in the seeds table)")
    args = p.parse_args(argv)
    model = load_model("toy")
    if args.floors:
        res = json.loads(args.floors.read_text())
        if res.get("weights_sha256") != fl.weights_sha256(TOY_DIR):
            raise SystemExit(f"{args.floors} belongs to other weights than {TOY_DIR / 'model.safetensors'}: "
                             "recompute it (python -m circuitlib.toy.floors) or leave --floors out")
    else:
        res = fl.floors(TOY_DIR, progress=True).to_dict()
    replicates = [json.loads(r.read_text()) for r in args.replicate]
    try:
        lines, heads = heads_section(model)
    except ImportError:
        lines, heads = ["(circuit discovery not available)"], {}
    (TOY_DIR / "MODEL_CARD.md").write_text(render(model, res, capital_templates(model), lines, replicates))
    print(json.dumps({"floors": res["floors"], "heads": heads}, indent=1, default=float))


if __name__ == "__main__":
    main()
