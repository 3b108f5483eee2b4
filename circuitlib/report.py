"""The headless pipeline behind ``python -m circuitlib report``.

Writes ``OUT/summary.json`` (every number), ``OUT/report.md`` (the numbers with the words a reader
needs) and the figures as PNG. Sections run in order, each adding to the same summary:
baseline (model, tasks, relations) -> circuit discovery -> MAPS head scores and causal checks ->
overlap and reuse. Tasks come from the registry (:data:`circuitlib.tasks.TASK_SPECS`, those with
``in_report``), so a new task needs no edit here.

Each finished section is written atomically to ``OUT/sections/<name>.json``; a rerun with the same
model and settings resumes from the sections already there (``resume=False`` recomputes them).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .metrics import evaluate
from .models import load_model, model_identity
from .tasks import TASK_SPECS, relation_table, report_tasks, task_batch
from .types import Circuit, HeadScores

N_PROMPTS = 128  # baseline evaluation prompts per task
DISCOVERY_PROMPTS = 64  # selection prompts per task (and as many held-out ones)
SEED = 0
TARGET = 0.85  # faithfulness a circuit must reach
FIGURE_RELATIONS = ("name_copying", "country_to_capital_wikidata")


class Context:
    """What the sections share: the model, the task batches, the output folder, results so far."""

    def __init__(self, model, out: Path, *, all_relations: bool, n_random: int, progress: bool):
        self.model = model
        self.out = out
        self.all_relations = all_relations
        self.n_random = n_random
        self.progress = progress
        self.tasks = report_tasks()
        self.summary: dict[str, Any] = {}
        self.figures: dict[str, str] = {}
        self.circuits: dict[str, Circuit] = {}
        self.patching: dict[str, HeadScores] = {}
        self.relation_scores: dict[str, HeadScores] = {}
        self.batches = {t: task_batch(t, model.tokenizer, N_PROMPTS, seed=SEED, model_name=model.cfg.model_name)
                        for t in self.tasks}

    def save_figure(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / f"{name}.png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = caption

    def relation_of(self, task: str) -> str | None:
        return TASK_SPECS[task].relation


def _title(task: str) -> str:
    return TASK_SPECS[task].title if task in TASK_SPECS else task


# ---------------------------------------------------------------------------------------------
# Sections: each returns a JSON-able dict; ``restore_*`` rebuilds the shared state from it


def section_baseline(ctx: Context) -> dict:
    """Model identity, per-task accuracy and logit difference, per-relation pair counts."""
    tasks = {t: {**evaluate(ctx.model, b), "split": b.meta.get("split")} for t, b in ctx.batches.items()}
    return {"model": model_identity(ctx.model), "tasks": tasks, "relations": relation_table(ctx.model.tokenizer)}


def section_discovery(ctx: Context) -> dict:
    """Circuit discovery per task: patching scores by every method, the head set, held-out faithfulness."""
    from . import plots
    from .circuits import discover_circuit

    found = {t: discover_circuit(ctx.model, t, n_prompts=DISCOVERY_PROMPTS, target=TARGET, seed=SEED,
                                 progress=ctx.progress) for t in ctx.tasks}
    out = {t: d.to_dict() for t, d in found.items()}
    restore_discovery(ctx, out)
    fig = plots.head_heatmaps(
        [ctx.patching[t] for t in ctx.tasks], vmin=-1.0, vmax=1.0, cmap=plots.DIVERGING_CMAP,
        panel_marks=[{f"{_title(t)} head set": ctx.circuits[t]} for t in ctx.tasks],
        titles=[f"{_title(t)}: activation patching" for t in ctx.tasks],
        cbar_label="patching effect (1 - normalised logit diff)",
        suptitle=f"{ctx.model.cfg.model_name}: per-head activation patching (noising)",
    )
    ctx.save_figure(fig, "patching_heads", "Per-head activation patching effect per task (noising: 1 = removing the "
                    "head's clean output costs the whole logit difference); marks = the head set discovery chose.")
    return out


def restore_discovery(ctx: Context, data: dict) -> None:
    for t, d in data.items():
        ctx.circuits[t] = Circuit.from_dict(d["circuit"])
        ctx.patching[t] = HeadScores.from_dict(d["scores"]["act_patch"])


def relation_summary(model, relations: Sequence[str], *, n_top: int = 10, causal: bool = True,
                     extra_tasks: Sequence[str] = (), n_prompts: int | None = None) -> dict[str, dict]:
    """Everything the report stores per relation, JSON-able: k, pairs used, static and suppression
    score maps, top heads, dynamic scores with and without context and their Pearson r with the
    static scores, and (``causal``) MAPS's causal check (``None`` when the relation has no prompts here)."""
    from .causal import causal_check
    from .scoring import dynamic_scores, static_dynamic_correlation, static_scores_many

    static = static_scores_many(model, list(relations))
    suppression = static_scores_many(model, list(relations), suppression=True)
    controls = {r["relation"] for r in relation_table(model.tokenizer) if r["valid"]} | set(relations)
    all_static = static_scores_many(model, sorted(controls)) if causal else static
    out = {}
    for name in relations:
        hs = static[name]
        dyn = {c: dynamic_scores(model, name, context=c) for c in (True, False)}
        check = None
        if causal:
            try:
                check = causal_check(model, name, scores=all_static, extra_tasks=extra_tasks, n_prompts=n_prompts,
                                     seed=SEED).to_dict()
            except ValueError as exc:
                check = {"skipped": str(exc)}
        out[name] = {
            "k": hs.k, "pairs_used": hs.meta["pairs_used"], "pairs_total": hs.meta["pairs_total"],
            "static": hs.to_dict(), "suppression": suppression[name].to_dict(),
            "top_heads": [{"head": f"{l}.{h}", "score": round(hs[(l, h)], 4)} for l, h in hs.top(n_top)],
            "top_suppression_heads": [{"head": f"{l}.{h}", "score": round(suppression[name][(l, h)], 4)}
                                      for l, h in suppression[name].top(n_top)],
            "dynamic_with_context": dyn[True].to_dict(), "dynamic_without_context": dyn[False].to_dict(),
            "r_static_dynamic": {key: None if math.isnan(r) else round(r, 4) for key, r in (
                ("with_context", static_dynamic_correlation(hs, dyn[True])),
                ("without_context", static_dynamic_correlation(hs, dyn[False])))},
            "causal_check": check,
        }
    return out


def section_scoring(ctx: Context) -> dict:
    """MAPS static / suppression / dynamic scores per relation and MAPS's causal check; the project's figure."""
    from . import plots
    from .causal import causal_curves

    valid = {r["relation"] for r in ctx.summary["baseline"]["relations"] if r["valid"]}
    relations = [r for r in dict.fromkeys([*FIGURE_RELATIONS, *(ctx.relation_of(t) for t in ctx.tasks)]) if r]
    if ctx.all_relations:
        relations += sorted(valid - set(relations))
    relations = [r for r in relations if r in valid]
    summary = relation_summary(ctx.model, relations, extra_tasks=ctx.tasks)
    restore_scoring(ctx, summary)
    shown = [r for r in FIGURE_RELATIONS if r in ctx.relation_scores]
    if shown:
        for kind, label in (("static", "MAPS score: fraction of pairs in top-k"),
                            ("suppression", "suppression score: fraction of pairs in bottom-k")):
            fig = plots.head_heatmaps(
                [HeadScores.from_dict(summary[r][kind]) for r in shown], marks=_reference_marks(ctx),
                titles=[plots.pretty_name(r) for r in shown], cbar_label=label,
                suptitle=f"{ctx.model.cfg.model_name}: MAPS {kind} scores ("
                         + ", ".join(f"k = {summary[r]['k']}" for r in shown) + ")")
            ctx.save_figure(fig, f"maps_{kind}", f"MAPS {kind} score of every head (layer on x, head on y), with "
                            + _marks_caption(ctx) + ".")
    for r in shown:
        dyn = HeadScores.from_dict(summary[r]["dynamic_without_context"])
        fig = plots.scatter_scores(ctx.relation_scores[r], dyn, r=summary[r]["r_static_dynamic"]["without_context"],
                                   xlabel="static score (parameters only)", ylabel="dynamic score, without context",
                                   title=plots.pretty_name(r))
        ctx.save_figure(fig, f"static_vs_dynamic_{r}", f"{plots.pretty_name(r)}: static vs dynamic (without context) "
                        "score per head.")
        check = summary[r]["causal_check"]
        if check and "skipped" not in check:
            c = _causal_from_dict(check)
            fig = plots.curve_plot(list(range(c.m + 1)), causal_curves(c), baseline={"clean": c.top.top1_accuracy[0]},
                                   xlabel="heads ablated (cumulative)", ylabel="top-1 accuracy",
                                   title=f"{plots.pretty_name(r)}: zero-ablating heads at the last position")
            ctx.save_figure(fig, f"causal_{r}", f"{plots.pretty_name(r)}: MAPS's causal check (top-1 accuracy as the "
                            "relation's top heads, random heads, and the relation's heads on other prompts are ablated).")
    return summary


def _causal_from_dict(d: dict):
    from .causal import CausalCheck, Curve

    def curve(x):
        return Curve(**x)

    return CausalCheck(**{**d, "top": curve(d["top"]), "random": [curve(x) for x in d["random"]],
                          "controls": {k: curve(v) for k, v in d["controls"].items()},
                          "extra_tasks": {k: curve(v) for k, v in d["extra_tasks"].items()}})


def restore_scoring(ctx: Context, data: dict) -> None:
    ctx.relation_scores = {r: HeadScores.from_dict(v["static"]) for r, v in data.items()}


def section_overlap(ctx: Context) -> dict:
    """Reuse across tasks and agreement of MAPS with causal discovery: one family of tests."""
    from . import plots
    from .reuse import reuse_analysis

    tasks = list(ctx.tasks)
    if len(tasks) < 2:
        return {"skipped": "needs at least two report tasks"}
    rel = {t: ctx.relation_scores[ctx.relation_of(t)] for t in tasks if ctx.relation_of(t) in ctx.relation_scores}
    result = reuse_analysis(ctx.model, rel, {t: ctx.patching[t] for t in tasks}, {t: ctx.circuits[t] for t in tasks},
                            {t: ctx.batches[t] for t in tasks}, n_random=ctx.n_random, seed=SEED)
    for key, pair in result.pairs.items():
        if "maps_topk_curve" in pair:
            a, b = key.split("|")
            fig = plots.topk_overlap_plot(pair["maps_topk_curve"], title=f"MAPS top-k heads shared: "
                                          f"{plots.pretty_name(ctx.relation_of(a))} vs {plots.pretty_name(ctx.relation_of(b))}")
            ctx.save_figure(fig, f"topk_overlap_{a}_{b}", "Heads shared by two relations' top-k MAPS heads, against chance.")
    shown = [t for t in tasks if t in rel]
    if len(shown) >= 2:
        fig = plots.head_heatmaps(
            [rel[t] for t in shown], titles=[plots.pretty_name(rel[t].target) for t in shown],
            panel_marks=[{f"{_title(o)} head set": ctx.circuits[o] for o in shown if o != t} for t in shown],
            cbar_label="MAPS score: fraction of pairs in top-k",
            suptitle="MAPS scores with the other tasks' head sets marked")
        ctx.save_figure(fig, "maps_other_tasks", "Each relation's MAPS scores with the other tasks' head sets marked.")
    return result.to_dict()


def _reference_marks(ctx: Context) -> dict:
    """gpt2-medium & co: the published mover heads; otherwise the head sets discovery just found."""
    from .scoring import reference_heads

    published = reference_heads(ctx.model.cfg.model_name)
    if published:
        return {"mover heads (Merullo et al. 2024, as given; not yet checked against the paper)": published}
    return {f"{_title(t)} head set (activation patching)": c for t, c in ctx.circuits.items()}


def _marks_caption(ctx: Context) -> str:
    from .scoring import reference_heads

    if reference_heads(ctx.model.cfg.model_name):
        return "the mover heads of Merullo et al. 2024 marked"
    return "the head sets circuit discovery found marked"


SECTIONS: list[tuple[str, Callable[[Context], dict], Callable[[Context, dict], None] | None]] = [
    ("baseline", section_baseline, None),
    ("discovery", section_discovery, restore_discovery),
    ("scoring", section_scoring, restore_scoring),
    ("overlap", section_overlap, None),
]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux: ``ru_maxrss`` is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def run_report(model_name: str, out: str | Path, *, all_relations: bool = False, progress: bool = True,
               resume: bool = True, n_random: int | None = None, model=None) -> dict:
    """Run every section on ``model_name`` (or a loaded ``model``) and write the report to ``out``.

    ``n_random``: random head sets per cross-task ablation (default 2,000 on models of up to 100 heads,
    where they are cheap, else 200 — then those rows are reported apart from the test family).
    Returns the summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(SEED)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sections").mkdir(exist_ok=True)
    t0 = time.time()
    if model is None:
        model = load_model(model_name)
    if torch.get_num_threads() > 1 and model.cfg.n_layers * model.cfg.n_heads <= 100:
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads and lose a lot under load
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    n_random = n_random if n_random is not None else (2000 if n_heads <= 100 else 200)
    ctx = Context(model, out, all_relations=all_relations, n_random=n_random, progress=progress)
    settings = {"model": model_identity(model), "all_relations": all_relations, "n_random": n_random,
                "tasks": list(ctx.tasks), "seed": SEED, "prompts": [N_PROMPTS, DISCOVERY_PROMPTS], "target": TARGET}
    timings = {"load": round(time.time() - t0, 2)}
    resumed = []
    bar = tqdm(SECTIONS, desc="report", disable=not progress)
    for name, section, restore in bar:
        bar.set_postfix_str(name)
        path = out / "sections" / f"{name}.json"
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                ctx.summary[name] = saved["result"]
                ctx.figures.update(saved.get("figures", {}))
                timings[name] = saved.get("seconds", 0.0)
                if restore:
                    restore(ctx, saved["result"])
                resumed.append(name)
                continue
        t = time.time()
        before = dict(ctx.figures)
        ctx.summary[name] = section(ctx)
        timings[name] = round(time.time() - t, 2)
        new_figs = {k: v for k, v in ctx.figures.items() if k not in before}
        _write_atomic(path, json.dumps({"settings": settings, "result": ctx.summary[name], "figures": new_figs,
                                        "seconds": timings[name]}))
    ctx.summary["settings"] = settings
    ctx.summary["timings_seconds"] = timings
    ctx.summary["resumed_sections"] = resumed
    ctx.summary["peak_rss_gib"] = peak_rss_gib()
    ctx.summary["figures"] = {name: {"file": f"{name}.png", "caption": cap} for name, cap in ctx.figures.items()}
    _write_atomic(out / "summary.json", json.dumps(ctx.summary, indent=2) + "\n")
    _write_atomic(out / "report.md", render_markdown(ctx.summary))
    if progress:
        print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(ctx.figures)} figures "
              f"in {time.time() - t0:.1f}s" + (f" (resumed: {', '.join(resumed)})" if resumed else ""))
    return ctx.summary


# ---------------------------------------------------------------------------------------------
# report.md


def _f(v, nd=2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _tasks_md(base: dict) -> list[str]:
    lines = ["## Tasks", "",
             "Each task has clean prompts and corrupted twins that differ in one token and change the answer. "
             "*Accuracy* is two-way: the answer's logit beats the competing answer's (IOI: the indirect object beats "
             "the subject; capitals: the capital beats the corrupted country's capital), so chance is 0.5. "
             "*Top-1 accuracy*: the answer is the model's first choice over the whole vocabulary. *Logit difference*: "
             "answer minus competitor at the last position, on the clean and the corrupted prompts.", "",
             "| task | prompts | accuracy | top-1 accuracy | logit diff clean | logit diff corrupt |",
             "|---|---|---|---|---|---|"]
    for task, r in base["tasks"].items():
        lines.append(f"| {_title(task)} | {r['n_prompts']} ({r['split'] or 'no split'}) | {r['accuracy']:.3f} "
                     f"| {r['top1_accuracy']:.3f} | {r['logit_diff']:.2f} | {r['corrupt_logit_diff']:.2f} |")
    valid = [r for r in base["relations"] if r["valid"]]
    return lines + ["", "## Relations", "",
                    f"{len(valid)} of {len(base['relations'])} MAPS relations keep at least 30 pairs whose source and "
                    "target are single tokens for this tokenizer (MAPS's filter): "
                    + ", ".join(f"{r['relation']} ({r['kept']}/{r['total']})" for r in valid) + ".", ""]


def _discovery_md(disc: dict) -> list[str]:
    if not disc:
        return []
    first = next(iter(disc.values()))
    target = first["meta"]["target"]
    lines = ["## Circuit discovery", "",
             "Every head is scored by **activation patching** (noising: the clean prompt runs, and one head's output "
             "at every position is replaced by its output on the corrupted prompt; the score is the fraction of the "
             "logit difference lost, so 1 = the head carries it all, 0 = nothing, negative = the head works against "
             "the answer), by attribution patching (a gradient approximation) and by path patching to the logits. "
             f"The head set is the smallest top-k by |activation patching| whose **faithfulness** reaches {target:.0%} "
             f"on {first['meta']['n_selection']} selection prompts: every other head is mean-ablated (its output "
             "replaced by its mean over the corrupted prompts, BOS excluded) and faithfulness is the remaining logit "
             "difference as a fraction of the full model's. It is then measured again on "
             f"{first['meta']['n_heldout']} held-out prompts under five ablation conventions, with 95% bootstrap "
             "intervals over prompts. A head set is called a **circuit** only when it reaches the target on held-out "
             "prompts under at least two conventions.", "",
             "| task | head set | reached target (selection) | mean | mean, BOS in means | template mean | resample "
             "| zero | conventions reaching the target |", "|---|---|---|---|---|---|---|---|---|"]
    for task, d in disc.items():
        cells = [f"{h['faithfulness']:.2f} [{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]" for h in d["heldout"].values()]
        verdict = f"{len(d['robust'])} of {len(d['heldout'])}" + (": a circuit" if len(d["robust"]) >= 2 else
                                                                  ": not called a circuit")
        lines.append(f"| {_title(task)} | {', '.join(d['circuit']['heads'])} | "
                     f"{'yes' if d['reached_target'] else 'no (most faithful k shown)'} "
                     f"({d['selection']['faithfulness']:.2f}) | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Held-out faithfulness under each convention, with its 95% bootstrap interval. Faithfulness above 1 "
              "means the head set alone gives a larger logit difference than the full model (other heads pull "
              "against the answer).", ""]
    t = {task: d["timings"] for task, d in disc.items()}
    lines += ["Time per method (s): " + "; ".join(f"{_title(k)}: " + ", ".join(f"{m} {v:.1f}" for m, v in tt.items())
                                               for k, tt in t.items()), ""]
    return lines


def _scoring_md(scoring: dict) -> list[str]:
    if not scoring:
        return []
    lines = ["## MAPS head scores (parameters only)", "",
             "A head's **static score** for a relation is the fraction of its (source, target) pairs for which the "
             "head's OV circuit maps the source token's embedding to the target among its top-k vocabulary entries "
             "(k = 1 for copying relations, 10 otherwise): m = x_s W_V W_O W_U, no forward pass. The *suppression* "
             "score asks the same of -m. *Dynamic* scores apply the same test to what the head actually writes at "
             "the last position of neutral prompts; r is their Pearson correlation with the static scores over all "
             "heads.", "",
             "| relation | k | pairs | top heads (score) | top suppression heads | r static-dynamic (without / with context) |",
             "|---|---|---|---|---|---|"]
    for rel, r in scoring.items():
        top = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in r["top_heads"][:3])
        sup = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in r["top_suppression_heads"][:3])
        rr = r["r_static_dynamic"]
        lines.append(f"| {rel} | {r['k']} | {r['pairs_used']}/{r['pairs_total']} | {top} | {sup} "
                     f"| {_f(rr['without_context'])} / {_f(rr['with_context'])} |")
    lines += ["", "### MAPS's causal check", "",
              "As the MAPS authors run it: the relation's heads with a positive static score, best first, are "
              "zero-ablated cumulatively at the last position of the relation's prompts, and top-1 accuracy is "
              "tracked; baselines are as many random heads (from all heads except the relation's, 5 draws) and the "
              "relation's heads ablated on *other* relations' prompts (the control: relations sharing < 15% of the "
              "heads, clean accuracy within 0.2). circuitlib adds the two-way accuracy, the relation's heads on "
              "the report's tasks, and layer-matched random live heads with a p-value.", "",
              "| relation | prompts | m | heads | top-1 clean -> heads ablated | random heads (MAPS) | controls "
              "| layer-matched random (mean, p) |", "|---|---|---|---|---|---|---|---|"]
    for rel, r in scoring.items():
        c = r.get("causal_check")
        if not c or "skipped" in c:
            lines.append(f"| {rel} | — | — | — | {'skipped: ' + c['skipped'] if c else 'not run'} | | | |")
            continue
        s = c["summary"]
        ctrl = "; ".join(f"{k}: {v[0]:.2f} -> {v[1]:.2f}" for k, v in s["control_top1_accuracy"].items()) or \
            f"none qualified ({len(c['control_candidates'])} considered)"
        er = c["extra_random"]
        extra = f"{er['top1_accuracy_mean']:.2f}, p = {er['p_value']:.3g} ({er['n_draws']} sets)" if er.get("n_draws") \
            else er.get("note", "—")
        lines.append(f"| {rel} | {c['prompts']} | {c['m']} | {', '.join(c['top']['heads'])} | "
                     f"{s['clean_top1_accuracy']:.2f} -> {s['top_top1_accuracy']:.2f} "
                     f"| {_f(s.get('random_top1_accuracy'))} | {ctrl} | {extra} |")
    lines += ["", "m follows MAPS's rule (50 heads for gpt2-medium's 384); on models so small that the rule would "
              "ablate more than a quarter of the heads, gpt2-medium's ratio (3 of the embedded model's 24).", ""]
    return lines


def _overlap_md(overlap: dict) -> list[str]:
    from .overlap import TestRow, test_table

    if not overlap or "skipped" in overlap or not overlap.get("table"):
        return []
    tab = overlap["table"]
    rows = [TestRow(**{k: r[k] for k in ("name", "statistic", "value", "p", "how", "n", "min_p")}) for r in tab["rows"]]
    table = test_table(rows, alpha=tab["alpha"], correction=tab["correction"])
    lines = ["## Overlap and reuse", "",
             "Do the tasks' head sets share heads, do MAPS scores find the heads causal discovery finds, and does "
             "removing one task's head set hurt another task? All tests form **one family**, corrected together "
             f"(Holm). Rank statistics use only the **live heads** ({len(overlap['live_heads'])} of them: heads whose "
             "OV weights are not switched off), because dead heads tie at zero and would make any two scorings look "
             "alike. p-values are exact (all permutations / labellings, or hypergeometric) where feasible, else "
             "Monte Carlo with >= 20,000 permutations; random-set ablation p-values count the random head sets that "
             "hurt at least as much (with +1). 'can reach' says whether a test could be significant at all at its n.",
             "", table.to_markdown(), ""]
    if overlap.get("apart"):
        ap = overlap["apart"]
        rows = [TestRow(**{k: r[k] for k in ("name", "statistic", "value", "p", "how", "n", "min_p")}) for r in ap["rows"]]
        lines += ["Kept apart from the family (too few random draws for their p to pass the corrected bar):", "",
                  test_table(rows, alpha=ap["alpha"]).to_markdown(), ""]
    lines += [f"- {n}" for n in overlap.get("notes", [])]
    return lines + [""]


def render_markdown(s: dict) -> str:
    """report.md from a summary (so a resumed run renders the same)."""
    base = s["baseline"]
    m = base["model"]
    lines = [f"# circuitlib report: {m['name']}", "",
             f"{m['n_layers']} layers x {m['n_heads']} heads, d_model {m['d_model']}, vocabulary {m['d_vocab']}"
             f"{', attention-only' if m['attn_only'] else ''}; {m['n_params']:,} parameters. Weights unprocessed "
             "(no LayerNorm folding), as MAPS uses them. Heads are named layer.head.", ""]
    lines += _tasks_md(base) + _discovery_md(s.get("discovery", {})) + _scoring_md(s.get("scoring", {}))
    lines += _overlap_md(s.get("overlap", {}))
    lines += ["## Figures", ""]
    for name, fig in s.get("figures", {}).items():
        lines += [f"![{fig['caption']}]({fig['file']})", "", f"*{fig['caption']}*", ""]
    t = s["timings_seconds"]
    lines += ["Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + f"; peak memory {s['peak_rss_gib']:.2f} GiB"
              + (f"; resumed sections: {', '.join(s['resumed_sections'])}" if s.get("resumed_sections") else "") + ".", ""]
    return "\n".join(lines)
