"""The headless pipeline behind ``python -m circuitlib report``.

Writes ``OUT/summary.json`` (every number), ``OUT/report.md`` (the main numbers, linking the figures)
and the figures as PNG. Sections run in order, each adding to the same summary:
model and task baselines -> head scoring -> circuit discovery -> overlap / reuse.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

import math
from typing import Sequence

from .metrics import evaluate
from .models import load_model, model_identity
from .tasks import TASKS, relation_table, task_batch

N_PROMPTS = 128
SEED = 0


class Context:
    """What the sections share: the model, the task batches, the output folder, the summary so far."""

    def __init__(self, model, out: Path, *, all_relations: bool):
        self.model = model
        self.out = out
        self.all_relations = all_relations
        self.summary: dict[str, Any] = {}
        self.figures: dict[str, str] = {}
        self.discovery: dict = {}
        self.relation_scores: dict = {}
        self.batches = {
            task: task_batch(task, model.tokenizer, N_PROMPTS, seed=SEED, model_name=model.cfg.model_name)
            for task in TASKS
        }

    def save_figure(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = caption


def section_baseline(ctx: Context) -> dict:
    """Model identity, per-task accuracy and logit difference, per-relation pair counts."""
    tasks = {task: evaluate(ctx.model, batch) for task, batch in ctx.batches.items()}
    for task, batch in ctx.batches.items():
        tasks[task]["split"] = batch.meta.get("split")
    return {
        "model": model_identity(ctx.model),
        "tasks": tasks,
        "relations": relation_table(ctx.model.tokenizer),
    }


def section_discovery(ctx: Context) -> dict:
    """Circuit discovery per task: patching scores by every method, the circuit, faithfulness, timings."""
    from . import plots
    from .circuits import discover_circuit

    ctx.discovery = {task: discover_circuit(ctx.model, task, n_prompts=DISCOVERY_PROMPTS) for task in TASKS}
    scores = [ctx.discovery[t].scores["act_patch"] for t in TASKS]
    fig = plots.head_heatmaps(
        scores, vmin=-1.0, vmax=1.0, cmap="RdBu_r", panel_marks=[ctx.discovery[t].circuit for t in TASKS],
        titles=[f"{TASK_TITLES[t]}: activation patching" for t in TASKS],
        suptitle=f"{ctx.model.cfg.model_name} · per-head patching effect (noising, normalised logit diff); X = circuit",
    )
    ctx.save_figure(fig, "patching_heads", "Per-head activation patching effect per task; X marks the assembled circuit.")
    return {task: d.to_dict() for task, d in ctx.discovery.items()}


def section_scoring(ctx: Context) -> dict:
    """MAPS static / suppression / dynamic scores per relation, r, causal check; the project's figure."""
    from . import plots
    from .causal import causal_curves
    from .scoring import reference_heads
    from .types import HeadScores

    relations = list(FIGURE_RELATIONS)
    if ctx.all_relations:
        relations += [r["relation"] for r in relation_table(ctx.model.tokenizer)
                      if r["valid"] and r["relation"] not in relations]
    relations = [r for r in relations if _valid(ctx, r)]
    summary = relation_summary(ctx.model, relations)
    ctx.relation_scores = {r: HeadScores.from_dict(summary[r]["static"]) for r in relations}
    shown = [r for r in FIGURE_RELATIONS if r in ctx.relation_scores]
    if shown:
        for kind in ("static", "suppression"):
            fig = plots.head_heatmaps(
                [HeadScores.from_dict(summary[r][kind]) for r in shown], marks=_reference_marks(ctx, reference_heads),
                suptitle=f"{ctx.model.cfg.model_name} · MAPS {kind} scores (unprocessed weights; "
                         + ", ".join(f"k={summary[r]['k']}" for r in shown) + ")",
            )
            ctx.save_figure(fig, f"maps_{kind}", f"MAPS {kind} scores per head, with the reference heads marked.")
    for r in shown:
        dyn = HeadScores.from_dict(summary[r]["dynamic_without_context"])
        fig = plots.scatter_scores(ctx.relation_scores[r], dyn, r=summary[r]["r_static_dynamic"]["without_context"],
                                   xlabel="static (MAPS)", ylabel="dynamic, without context", title=plots.pretty_name(r))
        ctx.save_figure(fig, f"static_vs_dynamic_{r}", f"{plots.pretty_name(r)}: static vs dynamic score per head.")
        ablation = summary[r]["ablation"]
        if ablation:
            fig = plots.curve_plot(ablation["m"], causal_curves(ablation), baseline={"chance": 0.5},
                                   title=f"{plots.pretty_name(r)}: {ablation['ablation']['kind']}-ablating heads, {ablation['task']} task")
            ctx.save_figure(fig, f"ablation_{r}", f"{plots.pretty_name(r)}: accuracy as top heads vs random heads are ablated.")
    return summary


def section_overlap(ctx: Context) -> dict:
    """Reuse across tasks and agreement of MAPS with causal discovery, with p-values."""
    from . import plots
    from .reuse import reuse_analysis

    tasks = [t for t in TASKS if TASK_RELATION[t] in ctx.relation_scores]
    if len(tasks) < 2:
        return {"skipped": "needs both figure relations valid for this tokenizer"}
    result = reuse_analysis(
        ctx.model,
        {t: ctx.relation_scores[TASK_RELATION[t]] for t in tasks},
        {t: ctx.discovery[t].scores["act_patch"] for t in tasks},
        {t: ctx.discovery[t].circuit for t in tasks},
        {t: ctx.batches[t] for t in tasks},
    )
    a, b = tasks
    curve = result["pairs"][f"{a}|{b}"]["maps"]["topk_curve"]
    fig = plots.topk_overlap_plot(curve, title="MAPS top-k heads shared: name copying vs country -> capital")
    ctx.save_figure(fig, "topk_overlap", "Overlap of the two relations' top-k MAPS heads against chance.")
    fig = plots.head_heatmaps(
        [ctx.relation_scores[TASK_RELATION[t]] for t in tasks],
        panel_marks=[{f"{TASK_TITLES[o]} circuit": ctx.discovery[o].circuit} for o in (b, a)],
        suptitle="MAPS scores with the *other* task's circuit marked",
    )
    ctx.save_figure(fig, "maps_other_circuit", "Each relation's MAPS scores with the other task's circuit marked.")
    return result


def _valid(ctx: Context, relation: str) -> bool:
    return any(r["relation"] == relation and r["valid"] for r in ctx.summary["baseline"]["relations"])


def _reference_marks(ctx: Context, reference_heads) -> dict:
    """gpt2-medium & co: the published mover heads; otherwise the circuits discovery just found."""
    published = reference_heads(ctx.model.cfg.model_name)
    if published:
        return {"mover heads (Merullo et al. 2024)": published}
    return {f"{TASK_TITLES[t]} circuit": d.circuit for t, d in ctx.discovery.items()}


FIGURE_RELATIONS = ("name_copying", "country_to_capital_wikidata")
TASK_RELATION = {"ioi": "name_copying", "capitals": "country_to_capital_wikidata"}
TASK_TITLES = {"ioi": "IOI", "capitals": "Capitals"}
DISCOVERY_PROMPTS = 64

SECTIONS: list[tuple[str, Callable[[Context], dict]]] = [
    ("baseline", section_baseline),
    ("discovery", section_discovery),
    ("scoring", section_scoring),
    ("overlap", section_overlap),
]


def run_report(model_name: str, out: str | Path, *, all_relations: bool = False, progress: bool = True) -> dict:
    """Run every section on ``model_name`` and write the report to ``out``; returns the summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(SEED)
    if torch.get_num_threads() > 1 and model_name == "toy":
        torch.set_num_threads(1)  # the toy's tiny matrices gain nothing from threads, and lose a lot under load
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = load_model(model_name)
    ctx = Context(model, out, all_relations=all_relations)
    timings = {"load": round(time.time() - t0, 2)}
    bar = tqdm(SECTIONS, desc="report", disable=not progress)
    for name, section in bar:
        bar.set_postfix_str(name)
        t = time.time()
        ctx.summary[name] = section(ctx)
        timings[name] = round(time.time() - t, 2)
    ctx.summary["timings_seconds"] = timings
    ctx.summary["figures"] = {name: f"{name}.png" for name in ctx.figures}
    (out / "summary.json").write_text(json.dumps(ctx.summary, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(ctx))
    if progress:
        print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(ctx.figures)} figures "
              f"in {time.time() - t0:.1f}s")
    return ctx.summary


def _discovery_md(disc: dict) -> list[str]:
    if not disc:
        return []
    target = next(iter(disc.values()))["meta"]["target"]
    lines = ["## Circuit discovery", "",
             "Activation patching per head (noising: corrupted -> clean, normalised logit difference); the circuit is "
             f"the smallest top-k whose mean-ablated complement keeps >= {target:.0%} of the logit difference.", "",
             "| task | circuit | heads | faithfulness | act. patching | attribution | path patching |", "|---|---|---|---|---|---|---|"]
    for task, d in disc.items():
        t = d["timings_s"]
        lines.append(f"| {task} | {', '.join(d['circuit']['heads'])} | {len(d['circuit']['heads'])} "
                     f"| {d['faithfulness']['faithfulness']:.2f} | {t.get('act_patch', 0):.2f}s "
                     f"| {t.get('attribution', 0):.2f}s | {t.get('path_patch', 0):.2f}s |")
    return lines + [""]


def _scoring_md(scoring: dict) -> list[str]:
    if not scoring:
        return []
    lines = ["## MAPS head scores", "",
             "| relation | k | pairs | top heads (score) | r static-dynamic (without / with context) | ablation on task: top-m / random (accuracy) |",
             "|---|---|---|---|---|---|"]
    for rel, r in scoring.items():
        top = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in r["top_heads"][:3])
        rr = r["r_static_dynamic"]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        abl = r.get("ablation")
        abl_txt = "—" if not abl else (
            f"{abl['task']}: {abl['summary']['clean_accuracy']:.2f} -> {abl['summary']['top_accuracy']:.2f} / "
            f"{abl['summary']['random_accuracy']:.2f} (m={abl['summary']['m']}, {abl['ablation']['kind']})")
        lines.append(f"| {rel} | {r['k']} | {r['pairs_used']}/{r['pairs_total']} | {top} "
                     f"| {fmt(rr['without_context'])} / {fmt(rr['with_context'])} | {abl_txt} |")
    return lines + [""]


def _overlap_md(overlap: dict) -> list[str]:
    if not overlap.get("p_values"):
        return []
    lines = ["## Overlap and reuse", "", "| test | value | p |", "|---|---|---|"]
    for t in overlap["p_values"]:
        value = t["value"]
        value = f"{value:.3f}" if isinstance(value, float) else str(value)
        name = t["test"].replace("|", "\\|")
        lines.append(f"| {name} | {value} | {t['p']:.3g} |")
    return lines + ["", f"{len(overlap['p_values'])} tests; with a Bonferroni correction a result is significant at "
                        f"p < {0.05 / len(overlap['p_values']):.4f}.", ""]


def render_markdown(ctx: Context) -> str:
    s = ctx.summary
    base = s["baseline"]
    m = base["model"]
    lines = [
        f"# circuitlib report — {m['name']}",
        "",
        f"{m['n_layers']} layers x {m['n_heads']} heads, d_model {m['d_model']}, vocabulary {m['d_vocab']}"
        f"{', attention-only' if m['attn_only'] else ''}; {m['n_params']:,} parameters. "
        "Unprocessed weights (MAPS convention).",
        "",
        "## Tasks",
        "",
        "| task | prompts | accuracy (answer beats wrong) | top-1 accuracy | logit diff clean | logit diff corrupt |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in base["tasks"].items():
        lines.append(
            f"| {task} | {r['n_prompts']} ({r['split']}) | {r['accuracy']:.3f} | {r['top1_accuracy']:.3f} "
            f"| {r['logit_diff']:.2f} | {r['corrupt_logit_diff']:.2f} |"
        )
    valid = [r for r in base["relations"] if r["valid"]]
    lines += ["", "## Relations", "",
              f"{len(valid)} of {len(base['relations'])} MAPS relations keep >= 30 single-token pairs: "
              + ", ".join(f"{r['relation']} ({r['kept']}/{r['total']})" for r in valid) + ".", ""]
    lines += _discovery_md(s.get("discovery", {})) + _scoring_md(s.get("scoring", {})) + _overlap_md(s.get("overlap", {}))
    lines += ["## Figures", ""]
    for name, caption in ctx.figures.items():
        lines += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]
    lines += [f"Total time: {sum(s['timings_seconds'].values()):.1f}s.", ""]
    return "\n".join(lines)


def relation_summary(
    model,
    relations: Sequence[str] = ("name_copying", "country_to_capital_wikidata"),
    *,
    n_top: int = 10,
    causal: bool = True,
    causal_kwargs: dict | None = None,
) -> dict[str, dict]:
    """Everything the report stores per relation, JSON-able: k, pairs used, the static and
    suppression score matrices (:meth:`HeadScores.to_dict`), the top heads with scores, dynamic scores
    with and without context and their Pearson r with the static scores, and (``causal``) the
    :func:`causal_check` result (relations without a task get ``None``)."""
    from .causal import TASK_OF_RELATION, causal_check
    from .scoring import dynamic_scores, static_dynamic_correlation, static_scores_many

    static = static_scores_many(model, list(relations))
    suppression = static_scores_many(model, list(relations), suppression=True)
    out = {}
    for name in relations:
        hs = static[name]
        dyn = {ctx: dynamic_scores(model, name, context=ctx) for ctx in (True, False)}
        out[name] = {
            "k": hs.k,
            "pairs_used": hs.meta["pairs_used"],
            "pairs_total": hs.meta["pairs_total"],
            "static": hs.to_dict(),
            "suppression": suppression[name].to_dict(),
            "top_heads": [{"head": f"{l}.{h}", "score": round(hs[(l, h)], 4)} for l, h in hs.top(n_top)],
            "top_suppression_heads": [{"head": f"{l}.{h}", "score": round(suppression[name][(l, h)], 4)}
                                      for l, h in suppression[name].top(n_top)],
            "dynamic_with_context": dyn[True].to_dict(),
            "dynamic_without_context": dyn[False].to_dict(),
            "r_static_dynamic": {  # None when a map is constant (r undefined)
                key: None if math.isnan(r) else round(r, 4)
                for key, r in (("with_context", static_dynamic_correlation(hs, dyn[True])),
                               ("without_context", static_dynamic_correlation(hs, dyn[False])))
            },
            "ablation": (causal_check(model, name, scores=static, **(causal_kwargs or {}))
                         if causal and name in TASK_OF_RELATION else None),
        }
    return out
