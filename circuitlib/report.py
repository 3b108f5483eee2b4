"""The headless pipeline behind ``python -m circuitlib report``.

Writes ``OUT/summary.json`` (every number), ``OUT/report.md`` (the numbers with the words a reader
needs) and the figures as PNG. Sections run in order, each adding to the same summary:
baseline (model, tasks, relations) -> circuit discovery -> MAPS head scores and causal checks ->
overlap and reuse. Tasks come from the registry (:data:`circuitlib.tasks.TASK_SPECS`, those with
``in_report``), so a new task needs no edit here.

**How much work** (:func:`report_plan`): prompt counts and random draws come from the module
constants below; models with more than :data:`BIG_MODEL_HEADS` heads (gpt2-medium: 384) take the
smaller :data:`BIG_MODEL` counts, because every forward pass there costs ~100x the embedded model's
and the causal check and the cross-task ablation run thousands of them. ``plan={...}`` overrides any
count; the plan is stored in ``summary["settings"]["plan"]`` and stated in report.md.

**Choosing sections**: ``skip=`` leaves out ``"discovery"``, ``"scoring"``, ``"overlap"``, or parts:
``"path_patch"`` (discovery's path patching scores), ``"dynamic"`` (dynamic scores), ``"causal_check"``
(MAPS's causal checks). A skipped part is
recorded as ``{"skipped": reason}``; what depends on it (overlap needs discovery and scoring) is skipped
with it.

**Resuming**: each finished section is written atomically to ``OUT/sections/<name>.json``; a rerun with
the same model and settings resumes from the sections already there (``resume=False`` recomputes them).

**Progress and time**: ``progress=True`` shows a tqdm bar per section over its steps (ETA from the steps
done so far), a forward-pass counter inside long steps, and the library's own bars (patching) — on a
terminal, not in CI logs (``CI`` set, or stderr not a terminal); ``progress="always"`` shows them
anywhere, ``False`` never. Wall and CPU seconds of every section and step go to
``summary["timings_seconds"]`` / ``["cpu_seconds"]`` / ``["step_seconds"]``, peak resident memory to
``["peak_rss_gib"]`` — the only entries that differ between two runs with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from transformer_lens import HookedTransformer

from .metrics import accuracy, logit_diff, top1_accuracy
from .models import load_model, model_identity
from .tasks import TASK_SPECS, relation_table, report_tasks, task_batch
from .types import Circuit, HeadScores, TaskBatch, parse_head

N_PROMPTS = 128  # baseline evaluation prompts per task (also the cross-task ablation's prompts)
DISCOVERY_PROMPTS = 64  # selection prompts per task (and as many held-out ones)
CAUSAL_PROMPTS: int | None = None  # MAPS causal-check prompts per relation (None: every pair, as MAPS)
CAUSAL_RANDOM = 200  # layer-matched random head sets in the causal check (circuitlib's extra baseline)
N_RANDOM = 2000  # random head sets per cross-task ablation
SEED = 0
TARGET = 0.85  # faithfulness a circuit must reach
FIGURE_RELATIONS = ("name_copying", "country_to_capital_wikidata")
BIG_MODEL_HEADS = 100
#: Counts for models with more than BIG_MODEL_HEADS heads. What they cost on gpt2-medium (2 CPU cores)
#: is measured by ``python -m circuitlib.rehearsal gpt2-medium`` (README, "Pointing it at gpt2-medium").
BIG_MODEL: dict[str, int | None] = {
    "n_prompts": 64,
    "discovery_prompts": 16,
    "causal_prompts": 16,
    "causal_random": 50,
    "n_random": 50,
    "reuse_prompts": 16,
}
PLAN_KEYS = ("n_prompts", "discovery_prompts", "causal_prompts", "causal_random", "n_random", "reuse_prompts",
             "screen", "max_k")
SKIPPABLE = ("discovery", "scoring", "overlap", "dynamic", "causal_check", "path_patch")
REFERENCE_FILE = Path(__file__).parent / "data" / "reference_heads.json"


def report_plan(model: HookedTransformer, plan: dict | None = None) -> dict[str, Any]:
    """Prompt counts and random draws for ``model``: the module constants, :data:`BIG_MODEL` above
    :data:`BIG_MODEL_HEADS` heads, then ``plan``'s entries (``None`` values are ignored).

    ``n_prompts``: baseline prompts per task; ``discovery_prompts``: selection prompts per task (as many
    held out); ``causal_prompts``: prompts per relation in MAPS's causal check (``None`` = every pair);
    ``causal_random``: layer-matched random head sets in the causal check; ``n_random``: random head
    sets per cross-task ablation; ``reuse_prompts``: prompts per task in the cross-task ablation
    (``None`` = the baseline prompts); ``screen``: path patching runs on the heads with the largest exact
    activation-patching effect, this many, ``max_k``: the largest head set discovery's faithfulness curve evaluates (both ``None`` =
    every head, the default up to :data:`BIG_MODEL_HEADS` heads; above it :data:`circuitlib.circuits.BIG_K_CAP`
    of the heads, 96 on gpt2-medium; given as 0 in ``plan`` they mean every head). See
    :func:`circuitlib.circuits.discover_circuit`."""
    unknown = set(plan or {}) - set(PLAN_KEYS)
    if unknown:
        raise ValueError(f"unknown plan entries {sorted(unknown)}: use {', '.join(PLAN_KEYS)}")
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    out: dict[str, Any] = {"n_prompts": N_PROMPTS, "discovery_prompts": DISCOVERY_PROMPTS,
                           "causal_prompts": CAUSAL_PROMPTS, "causal_random": CAUSAL_RANDOM, "n_random": N_RANDOM,
                           "reuse_prompts": None, "screen": None, "max_k": None}
    big = n_heads > BIG_MODEL_HEADS
    if big:
        from .circuits import BIG_K_CAP

        out.update(BIG_MODEL)
        out["screen"] = out["max_k"] = max(1, int(round(BIG_K_CAP * n_heads)))
    out.update({k: v for k, v in (plan or {}).items() if v is not None})
    for key in ("screen", "max_k"):  # 0: every head
        if out[key] is not None and int(out[key]) <= 0:
            out[key] = None
    if out["reuse_prompts"] is not None and out["reuse_prompts"] >= out["n_prompts"]:
        out["reuse_prompts"] = None
    out["rule"] = (f"{n_heads} heads > {BIG_MODEL_HEADS}: the big-model counts" if big
                   else f"{n_heads} heads <= {BIG_MODEL_HEADS}: the full counts") + (
        f"; given: {', '.join(sorted(k for k, v in plan.items() if v is not None))}" if plan else "")
    return out


# ---------------------------------------------------------------------------------------------
# Progress bars and timings


def bars_enabled(progress: bool | str) -> bool:
    """Whether to draw progress bars: ``"always"``; ``True`` on a terminal outside CI; never with ``False``."""
    if progress == "always":
        return True
    if not progress:
        return False
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextlib.contextmanager
def forward_counter(model: HookedTransformer, desc: str, enabled: bool) -> Iterator[None]:
    """A tqdm counter of the model's forward passes (from its embedding) while inside the block: a
    sign of life in steps that run many batched forwards (ablation curves, cross-task ablation)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"  {desc}", unit=" forward", leave=False, dynamic_ncols=True)

    def tick(module, inputs, output) -> None:  # must return None: a forward hook's return value replaces the output
        bar.update()

    handle = model.embed.register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


class Steps:
    """The steps of one section: a tqdm bar over them (its ETA comes from the steps done so far) and the
    wall / CPU seconds of each (into ``ctx.steps``)."""

    def __init__(self, ctx: "Context", section: str, total: int):
        from tqdm.auto import tqdm

        self.ctx = ctx
        self.bar = tqdm(total=total, desc=section, unit=" step", disable=not ctx.bars, dynamic_ncols=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        wall, cpu = time.perf_counter(), time.process_time()
        with forward_counter(self.ctx.model, name, self.ctx.bars):
            yield
        self.ctx.steps[name] = {"wall": round(time.perf_counter() - wall, 2),
                                "cpu": round(time.process_time() - cpu, 2)}
        self.bar.update()

    def resumed(self, n: int) -> None:
        """``n`` steps done by an earlier run (their timings come from its saved part)."""
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Context:
    """What the sections share: the model, the task batches, the output folder, results so far."""

    def __init__(self, model: HookedTransformer, out: Path, *, all_relations: bool, plan: dict, skip: frozenset[str], bars: bool):
        self.model = model
        self.out = out
        self.all_relations = all_relations
        self.plan = plan
        self.n_random = plan["n_random"]
        self.skip = skip
        self.bars = bars
        self.tasks = report_tasks()
        self.summary: dict[str, Any] = {}
        self.figures: dict[str, str] = {}
        self.circuits: dict[str, Circuit] = {}
        self.patching: dict[str, HeadScores] = {}
        self.relation_scores: dict[str, HeadScores] = {}
        self.steps: dict[str, Any] = {}  # the running section's step timings
        self.section = ""  # the running section, its resume key, whether to resume, the parts it resumed
        self.section_key: dict = {}
        self.resume = True
        self.resumed_parts: list[str] = []
        self.batches = {t: task_batch(t, model.tokenizer, plan["n_prompts"], seed=SEED,
                                      model_name=model.cfg.model_name) for t in self.tasks}
        self.big_grid = model.cfg.n_layers * model.cfg.n_heads > 64  # no cell annotations on the heatmaps

    def save_figure(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        fig.savefig(self.out / f"{name}.png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = caption

    def relation_of(self, task: str) -> str | None:
        return TASK_SPECS[task].relation

    @contextlib.contextmanager
    def section_steps(self, section: str, total: int) -> Iterator[Steps]:
        steps = Steps(self, section, total)
        self.current_steps = steps
        try:
            yield steps
        finally:
            steps.close()

    def part(self, key: str, compute: Callable[[], Any], *, n_steps: int = 1) -> Any:
        """One finished piece of the running section (a task's discovery, a relation's scores), saved to
        ``OUT/sections/<section>.parts/<key>.json`` with the section's resume key: an interrupted section
        resumes piece by piece. ``compute()`` returns JSON-able data; ``n_steps``: the progress-bar steps it
        takes (skipped on the bar when the piece is resumed)."""
        path = self.out / "sections" / f"{self.section}.parts" / f"{key.replace('/', '_')}.json"
        if self.resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == self.section_key:
                self.steps.update(saved.get("steps", {}))
                self.resumed_parts.append(f"{self.section}/{key}")
                self.current_steps.resumed(n_steps)
                return saved["result"]
        before = set(self.steps)
        result = json.loads(json.dumps(compute()))
        path.parent.mkdir(exist_ok=True)
        _write_atomic(path, json.dumps({"settings": self.section_key, "result": result,
                                        "steps": {k: v for k, v in self.steps.items() if k not in before}}))
        return result


def _title(task: str) -> str:
    return TASK_SPECS[task].title if task in TASK_SPECS else task


# ---------------------------------------------------------------------------------------------
# Sections: each returns a JSON-able dict; ``restore_*`` rebuilds the shared state from it


@torch.no_grad()
def evaluate_end(model: HookedTransformer, batch: TaskBatch, *, max_tokens: int = 4096) -> dict[str, float]:
    """:func:`circuitlib.metrics.evaluate` (same keys, same numbers) reading out only each prompt's END
    position: the forward stops before the final LayerNorm and the unembedding is applied to END's
    residual vector alone (:func:`circuitlib.interventions.readout`), in chunks of at most ``max_tokens``
    token rows. On gpt2-medium the full-vocabulary logits at every position cost as much as ~4 of its 24
    layers and 200 MB per 64 prompts; END-only costs one row per prompt."""
    from .interventions import readout

    L, device = model.cfg.n_layers, model.cfg.device
    B, S = batch.clean.shape
    step = max(1, max_tokens // S)
    out = {}
    for kind, tokens in (("clean", batch.clean), ("corrupt", batch.corrupt)):
        rows = []
        for lo in range(0, B, step):
            resid = model(tokens[lo:lo + step].to(device), stop_at_layer=L)
            end = batch.end[lo:lo + step].to(device)
            rows.append(readout(model, resid[torch.arange(resid.shape[0], device=device), end]).float().cpu())
        out[kind] = torch.cat(rows)  # [batch, vocab]
    return {
        "accuracy": accuracy(out["clean"], batch),
        "top1_accuracy": top1_accuracy(out["clean"], batch),
        "logit_diff": float(logit_diff(out["clean"], batch)),
        "corrupt_logit_diff": float(logit_diff(out["corrupt"], batch)),
        "n_prompts": len(batch),
    }


def section_baseline(ctx: Context) -> dict:
    """Model identity, per-task accuracy and logit difference, per-relation pair counts."""
    tasks = {}
    with ctx.section_steps("baseline", len(ctx.batches) + 1) as step:
        for t, b in ctx.batches.items():
            with step(f"evaluate {t}"):
                tasks[t] = {**evaluate_end(ctx.model, b), "split": b.meta.get("split")}
        with step("relation table"):
            relations = relation_table(ctx.model.tokenizer)
    return {"model": model_identity(ctx.model), "tasks": tasks, "relations": relations}


def section_discovery(ctx: Context) -> dict:
    """Circuit discovery per task: patching scores by every method, the head set, held-out faithfulness."""
    from . import plots
    from .circuits import HEAD_SCORERS, discover_circuit

    scorers = [s for s in HEAD_SCORERS if s not in ctx.skip]
    out = {}

    def discover(t: str) -> dict:
        with step(f"discover {t}"):
            try:
                d = discover_circuit(ctx.model, t, n_prompts=ctx.plan["discovery_prompts"], target=TARGET,
                                     scorers=scorers, seed=SEED, progress=ctx.bars, screen=ctx.plan.get("screen"),
                                     max_k=ctx.plan.get("max_k")).to_dict()
            except ValueError as exc:  # e.g. a model whose clean and corrupted prompts score alike
                return {"skipped": f"discovery failed: {exc}"}
        for method, seconds in d.pop("timings").items():  # timings stay out of the results
            ctx.steps[f"discover {t}: {method}"] = {"wall": seconds}
        return d

    with ctx.section_steps("discovery", len(ctx.tasks)) as step:
        for t in ctx.tasks:
            out[t] = ctx.part(t, lambda t=t: discover(t))
    restore_discovery(ctx, out)
    found = [t for t in ctx.tasks if t in ctx.circuits]
    if not found:
        return out
    fig = plots.head_heatmaps(
        [ctx.patching[t] for t in found], vmin=-1.0, vmax=1.0, cmap=plots.DIVERGING_CMAP,
        panel_marks=[{f"{_title(t)} head set": ctx.circuits[t]} for t in found],
        titles=[f"{_title(t)}: activation patching" for t in found],
        cbar_label="patching effect (1 - normalised logit diff)",
        suptitle=f"{ctx.model.cfg.model_name}: per-head activation patching (noising)",
    )
    ctx.save_figure(fig, "patching_heads", "Per-head activation patching effect per task (noising: 1 = removing the "
                    "head's clean output costs the whole logit difference); marks = the head set discovery chose.")
    return out


def restore_discovery(ctx: Context, data: dict) -> None:
    if "skipped" in data:
        return
    for t, d in data.items():
        if "skipped" in d:
            continue
        ctx.circuits[t] = Circuit.from_dict(d["circuit"])
        ctx.patching[t] = HeadScores.from_dict(d["scores"]["act_patch"])


def relation_summary(model: HookedTransformer, relations: Sequence[str], *, n_top: int = 10, causal: bool = True, dynamic: bool = True,
                     extra_tasks: Sequence[str] = (), n_prompts: int | None = None, n_extra_random: int = CAUSAL_RANDOM,
                     step: Callable[[str], Any] | None = None,
                     part: Callable[..., Any] | None = None) -> dict[str, dict]:
    """Everything the report stores per relation, JSON-able: k, pairs used, static and suppression
    score maps, top heads, (``dynamic``) dynamic scores with and without context and their Pearson r
    with the static scores, and (``causal``) MAPS's causal check (``{"skipped": why}`` when the relation
    has no prompts here). Parts left out are ``None``. ``n_prompts``: causal-check prompts per relation
    (``None``: every pair); ``n_extra_random``: its layer-matched random head sets. ``step(name)``: a
    context manager around each unit of work (the report's progress bar and timings); ``part(key, compute,
    n_steps=)``: runs each relation's dynamic scores and causal check (the report saves them as they finish)."""
    from .causal import causal_check
    from .scoring import dynamic_scores, static_dynamic_correlation, static_scores_many

    step = step or (lambda name: contextlib.nullcontext())
    part = part or (lambda key, compute, n_steps=1: compute())
    with step(f"static + suppression scores ({len(relations)} relations)"):
        static = static_scores_many(model, list(relations))
        suppression = static_scores_many(model, list(relations), suppression=True)
    if causal:
        controls = {r["relation"] for r in relation_table(model.tokenizer) if r["valid"]} | set(relations)
        with step(f"static scores of the causal check's {len(controls)} control candidates"):
            all_static = static_scores_many(model, sorted(controls))

    def forward_parts(name: str) -> dict:
        hs = static[name]
        dyn = r_sd = None
        if dynamic:
            with step(f"dynamic scores {name}"):
                dyn = {c: dynamic_scores(model, name, context=c) for c in (True, False)}
            r_sd = {key: None if math.isnan(r) else round(r, 4) for key, r in (
                ("with_context", static_dynamic_correlation(hs, dyn[True])),
                ("without_context", static_dynamic_correlation(hs, dyn[False])))}
        check = None
        if causal:
            with step(f"causal check {name}"):
                try:
                    check = causal_check(model, name, scores=all_static, extra_tasks=extra_tasks, n_prompts=n_prompts,
                                         n_extra_random=n_extra_random, seed=SEED).to_dict()
                except ValueError as exc:
                    check = {"skipped": str(exc)}
        return {"dynamic_with_context": dyn[True].to_dict() if dyn else None,
                "dynamic_without_context": dyn[False].to_dict() if dyn else None,
                "r_static_dynamic": r_sd, "causal_check": check}

    out = {}
    for name in relations:
        hs = static[name]
        done = part(name, lambda name=name: forward_parts(name), n_steps=int(dynamic) + int(causal))
        out[name] = {
            "k": hs.k, "pairs_used": hs.meta["pairs_used"], "pairs_total": hs.meta["pairs_total"],
            "static": hs.to_dict(), "suppression": suppression[name].to_dict(),
            "top_heads": [{"head": f"{l}.{h}", "score": round(hs[(l, h)], 4)} for l, h in hs.top(n_top)],
            "top_suppression_heads": [{"head": f"{l}.{h}", "score": round(suppression[name][(l, h)], 4)}
                                      for l, h in suppression[name].top(n_top)],
            **done,
        }
    return out


def _scoring_relations(ctx: Context) -> list[str]:
    valid = {r["relation"] for r in ctx.summary["baseline"]["relations"] if r["valid"]}
    relations = [r for r in dict.fromkeys([*FIGURE_RELATIONS, *(ctx.relation_of(t) for t in ctx.tasks)]) if r]
    if ctx.all_relations:
        relations += sorted(valid - set(relations))
    return [r for r in relations if r in valid]


def section_scoring(ctx: Context) -> dict:
    """MAPS static / suppression / dynamic scores per relation and MAPS's causal check; the project's figure."""
    from . import plots
    from .causal import causal_curves

    relations = _scoring_relations(ctx)
    causal, dynamic = "causal_check" not in ctx.skip, "dynamic" not in ctx.skip
    n_steps = 1 + int(causal) + len(relations) * (int(causal) + int(dynamic))
    with ctx.section_steps("scoring", n_steps) as step:
        summary = relation_summary(ctx.model, relations, causal=causal, dynamic=dynamic, extra_tasks=ctx.tasks,
                                   n_prompts=ctx.plan["causal_prompts"], n_extra_random=ctx.plan["causal_random"],
                                   step=step, part=ctx.part)
    restore_scoring(ctx, summary)
    shown = [r for r in FIGURE_RELATIONS if r in ctx.relation_scores]
    if shown:
        for kind, score_name, label in (("static", "MAPS static score", "fraction of pairs in top-k"),
                                        ("suppression", "MAPS suppression score", "fraction of pairs in bottom-k")):
            ctx.save_figure(_maps_figure(ctx, summary, shown, kind, score_name, label), f"maps_{kind}",
                            f"{score_name} of every head (layer on x, head on y; {label}), with "
                            + _marks_caption(ctx) + ".")
    for r in shown:
        if summary[r]["dynamic_without_context"] is not None:
            dyn = HeadScores.from_dict(summary[r]["dynamic_without_context"])
            fig = plots.scatter_scores(ctx.relation_scores[r], dyn, r=summary[r]["r_static_dynamic"]["without_context"],
                                       xlabel="static score (parameters only)", ylabel="dynamic score, without context",
                                       title=plots.pretty_name(r))
            ctx.save_figure(fig, f"static_vs_dynamic_{r}", f"{plots.pretty_name(r)}: static vs dynamic (without "
                            "context) score per head.")
        check = summary[r]["causal_check"]
        if check and "skipped" not in check:
            c = _causal_from_dict(check)
            fig = plots.curve_plot(list(range(c.m + 1)), causal_curves(c), baseline={"clean": c.top.top1_accuracy[0]},
                                   xlabel="heads ablated (cumulative)", ylabel="top-1 accuracy",
                                   title=f"{plots.pretty_name(r)}: zero-ablating heads at the last position")
            ctx.save_figure(fig, f"causal_{r}", f"{plots.pretty_name(r)}: MAPS's causal check (top-1 accuracy as the "
                            "relation's top heads, random heads, and the relation's heads on other prompts are ablated).")
    return summary


def _maps_figure(ctx: Context, summary: dict, shown: list[str], kind: str, score_name: str, label: str):
    """The seed figure as MAPS draws it: one layer x head panel per relation, colour scale 0-1, the
    relation as title, the score's name (and k) on each colour bar, X marks with their source in the legend."""
    from . import plots

    fig = plots.head_heatmaps(
        [HeadScores.from_dict(summary[r][kind]) for r in shown], marks=_reference_marks(ctx),
        titles=[plots.pretty_name(r) for r in shown], vmin=0.0, vmax=1.0, annotate=False if ctx.big_grid else None,
        cbar_label=score_name,
        suptitle=f"{ctx.model.cfg.model_name}: {score_name}s ({label})")
    for ax, r in zip(fig.axes, shown):  # the panels come first in fig.axes; each owns one colour bar
        mesh = ax.collections[0]
        if getattr(mesh, "colorbar", None) is not None:
            mesh.colorbar.set_label(f"{score_name} (k = {summary[r]['k']})", fontsize=10)
    return fig


def _causal_from_dict(d: dict):
    from .causal import CausalCheck, Curve

    def curve(x):
        return Curve(**x)

    return CausalCheck(**{**d, "top": curve(d["top"]), "random": [curve(x) for x in d["random"]],
                          "controls": {k: curve(v) for k, v in d["controls"].items()},
                          "extra_tasks": {k: curve(v) for k, v in d["extra_tasks"].items()}})


def restore_scoring(ctx: Context, data: dict) -> None:
    if "skipped" in data:
        return
    ctx.relation_scores = {r: HeadScores.from_dict(v["static"]) for r, v in data.items()}


def section_overlap(ctx: Context) -> dict:
    """Reuse across tasks and agreement of MAPS with causal discovery: one family of tests."""
    from . import plots
    from .reuse import reuse_analysis

    missing = [s for s in ("discovery", "scoring") if "skipped" in ctx.summary.get(s, {"skipped": ""})]
    if missing:
        return {"skipped": f"needs the {' and '.join(missing)} section{'s' if len(missing) > 1 else ''}, "
                           "which did not run"}
    tasks = [t for t in ctx.tasks if t in ctx.circuits]
    if len(tasks) < 2:
        return {"skipped": f"needs head sets of at least two report tasks; discovery found {len(tasks)}"}
    rel = {t: ctx.relation_scores[ctx.relation_of(t)] for t in tasks if ctx.relation_of(t) in ctx.relation_scores}
    r = ctx.plan["reuse_prompts"]
    batches = {t: ctx.batches[t] if r is None else ctx.batches[t][list(range(r))] for t in tasks}
    with ctx.section_steps("overlap", 1) as step:
        with step(f"reuse analysis ({len(tasks) ** 2} cross-task ablations x {ctx.n_random} random sets)"):
            try:
                result = reuse_analysis(ctx.model, rel, {t: ctx.patching[t] for t in tasks},
                                        {t: ctx.circuits[t] for t in tasks}, batches, n_random=ctx.n_random, seed=SEED)
            except ValueError as exc:  # e.g. a head set of every head leaves no random sets to draw
                return {"skipped": f"the reuse analysis could not run: {exc}"}
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
            cbar_label="MAPS static score (fraction of pairs in top-k)",
            suptitle="MAPS scores with the other tasks' head sets marked")
        ctx.save_figure(fig, "maps_other_tasks", "Each relation's MAPS scores with the other tasks' head sets marked.")
    return result.to_dict()


def reference_entry(model_name: str) -> dict | None:
    """The published head set to mark for ``model_name`` (``circuitlib/data/reference_heads.json``), with
    its legend label (which says whether the heads were checked against the paper), or ``None``."""
    entry = json.loads(REFERENCE_FILE.read_text()).get("models", {}).get(model_name)
    if not entry:
        return None
    status = entry.get("status", "")
    label = entry["label"] + (f" ({status})" if status and status != "checked against the paper" else "")
    return {"heads": [parse_head(h) for h in entry["heads"]], "label": label, "status": status}


def _reference_marks(ctx: Context) -> dict:
    """gpt2-medium & co: the published mover heads; otherwise the head sets discovery just found."""
    published = reference_entry(ctx.model.cfg.model_name)
    if published:
        return {published["label"]: published["heads"]}
    return {f"{_title(t)} head set (activation patching)": c for t, c in ctx.circuits.items()}


def _marks_caption(ctx: Context) -> str:
    published = reference_entry(ctx.model.cfg.model_name)
    if published:
        return f"X = {published['label']}"
    if ctx.circuits:
        return "the head sets circuit discovery found marked"
    return "no marks (circuit discovery did not run)"


SECTIONS: list[tuple[str, Callable[[Context], dict], Callable[[Context, dict], None] | None]] = [
    ("baseline", section_baseline, None),
    ("discovery", section_discovery, restore_discovery),
    ("scoring", section_scoring, restore_scoring),
    ("overlap", section_overlap, None),
]
#: What each section's result depends on besides the model, the tasks and the seed: plan entries, other
#: settings and skip entries. A rerun resumes a section only when all of these are unchanged.
SECTION_INPUTS: dict[str, tuple[str, ...]] = {
    "baseline": ("n_prompts",),
    "discovery": ("discovery_prompts", "screen", "max_k", "target", "skip:discovery", "skip:path_patch"),
    "scoring": ("causal_prompts", "causal_random", "all_relations", "skip:scoring", "skip:dynamic", "skip:causal_check"),
    "overlap": (*PLAN_KEYS, "target", "all_relations", *(f"skip:{s}" for s in SKIPPABLE)),
}


def weights_fingerprint(model: HookedTransformer) -> str:
    """A short hash of a strided sample (<= 256 values) of every parameter: a rerun resumes only on the same
    weights (a model name alone does not say which weights are behind it)."""
    import hashlib

    h = hashlib.sha1()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().flatten()
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def section_settings(name: str, base: dict, plan: dict, skip: frozenset[str]) -> dict:
    """What a saved section must match to be resumed (:data:`SECTION_INPUTS`). Scoring's figure marks the
    discovered head sets on models without published reference heads: there it depends on discovery too."""
    inputs = SECTION_INPUTS[name]
    if name == "scoring" and reference_entry(base["model"]["name"]) is None:
        inputs = (*inputs, *SECTION_INPUTS["discovery"])
    given = {**plan, "target": TARGET, "all_relations": base["all_relations"]}
    return {"model": base["model"], "weights": base["weights"], "tasks": base["tasks"], "seed": base["seed"],
            **{k: given[k] for k in inputs if not k.startswith("skip:")},
            "skip": sorted(s for s in skip if f"skip:{s}" in inputs)}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux: ``ru_maxrss`` is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def run_report(model_name: str, out: str | Path, *, all_relations: bool = False, progress: bool | str = True,
               resume: bool = True, n_random: int | None = None, model: HookedTransformer | None = None, plan: dict | None = None,
               skip: Sequence[str] = ()) -> dict:
    """Run every section on ``model_name`` (or a loaded ``model``) and write the report to ``out``.

    ``plan``: prompt counts and random draws (:func:`report_plan`; default by model size);
    ``n_random``: random head sets per cross-task ablation (same as ``plan={"n_random": ...}``; rows with
    fewer than 2,000 draws are reported apart from the test family). ``skip``: sections or parts to
    leave out (:data:`SKIPPABLE`). ``progress``: see the module docstring. Returns the summary."""
    skip = frozenset(skip)
    if skip - set(SKIPPABLE):
        raise ValueError(f"cannot skip {sorted(skip - set(SKIPPABLE))}: skippable are {', '.join(SKIPPABLE)}")
    torch.manual_seed(SEED)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sections").mkdir(exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    if model is None:
        model = load_model(model_name)
    if torch.get_num_threads() > 1 and model.cfg.n_layers * model.cfg.n_heads <= 100:
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads and lose a lot under load
    plan = report_plan(model, {**(plan or {}), **({"n_random": n_random} if n_random is not None else {})})
    bars = bars_enabled(progress)
    ctx = Context(model, out, all_relations=all_relations, plan=plan, skip=skip, bars=bars)
    base_settings = {"model": model_identity(model), "weights": weights_fingerprint(model),
                     "all_relations": all_relations, "tasks": list(ctx.tasks),
                     "seed": SEED, "target": TARGET, "plan": {k: plan[k] for k in PLAN_KEYS}}
    timings = {"load": round(time.time() - t0, 2)}
    cpu = {"load": round(time.process_time() - c0, 2)}
    step_seconds: dict[str, dict] = {}
    resumed = []
    for name, section, restore in SECTIONS:
        settings = section_settings(name, base_settings, plan, skip)
        path = out / "sections" / f"{name}.json"
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                ctx.summary[name] = saved["result"]
                ctx.figures.update(saved.get("figures", {}))
                timings[name] = saved.get("seconds", 0.0)
                cpu[name] = saved.get("cpu_seconds", 0.0)
                step_seconds[name] = saved.get("steps", {})
                if restore:
                    restore(ctx, saved["result"])
                resumed.append(name)
                continue
        t, c = time.time(), time.process_time()
        before = dict(ctx.figures)
        ctx.steps = {}
        ctx.section, ctx.section_key, ctx.resume = name, settings, resume
        if name in skip:
            ctx.summary[name] = {"skipped": "left out (skip)"}
        else:
            ctx.summary[name] = section(ctx)
        timings[name] = round(time.time() - t, 2)
        cpu[name] = round(time.process_time() - c, 2)
        step_seconds[name] = ctx.steps
        new_figs = {k: v for k, v in ctx.figures.items() if k not in before}
        _write_atomic(path, json.dumps({"settings": settings, "result": ctx.summary[name], "figures": new_figs,
                                        "seconds": timings[name], "cpu_seconds": cpu[name], "steps": ctx.steps}))
        shutil.rmtree(out / "sections" / f"{name}.parts", ignore_errors=True)  # the section file has it all
    ctx.summary["settings"] = {**base_settings, "skip": sorted(skip), "plan": plan}
    ctx.summary["timings_seconds"] = timings
    ctx.summary["cpu_seconds"] = cpu
    ctx.summary["step_seconds"] = step_seconds
    ctx.summary["resumed_sections"] = resumed + ctx.resumed_parts
    ctx.summary["peak_rss_gib"] = peak_rss_gib()
    ctx.summary["figures"] = {name: {"file": f"{name}.png", "caption": cap} for name, cap in ctx.figures.items()}
    _write_atomic(out / "summary.json", json.dumps(ctx.summary, indent=2) + "\n")
    _write_atomic(out / "report.md", render_markdown(ctx.summary))
    if progress:
        print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {len(ctx.figures)} figures "
              f"in {time.time() - t0:.1f}s" + (f" (resumed: {', '.join(resumed)})" if resumed else ""), file=sys.stderr)
    return ctx.summary


#: Entries of summary.json that measure the run rather than the model (differ between identical runs).
RUN_ENTRIES = ("timings_seconds", "cpu_seconds", "step_seconds", "resumed_sections", "peak_rss_gib", "rehearsal")


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


def _skipped_md(title: str, part: dict) -> list[str]:
    return [f"## {title}", "", f"Not run: {part['skipped']}.", ""]


def _discovery_md(disc: dict, steps: dict) -> list[str]:
    if not disc:
        return []
    if "skipped" in disc:
        return _skipped_md("Circuit discovery", disc)
    done = {t: d for t, d in disc.items() if "skipped" not in d}
    if not done:
        return ["## Circuit discovery", ""] + [f"{_title(t)}: {d['skipped']}." for t, d in disc.items()] + [""]
    first = next(iter(done.values()))
    target = first["meta"]["target"]
    lines = ["## Circuit discovery", "",
             "Every head is scored by **activation patching** (noising: the clean prompt runs, and one head's output "
             "at every position is replaced by its output on the corrupted prompt; the score is the fraction of the "
             "logit difference lost, so 1 = the head carries it all, 0 = nothing, negative = the head works against "
             "the answer), by attribution patching (a gradient approximation)"
             + (" and by path patching to the logits. " if "path_patch" in first["scores"] else
                " (path patching left out on request). ") +
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
        if "skipped" in d:
            lines.append(f"| {_title(task)} | {d['skipped']} | | | | | | | |")
            continue
        cells = [f"{h['faithfulness']:.2f} [{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]" for h in d["heldout"].values()]
        verdict = f"{len(d['robust'])} of {len(d['heldout'])}" + (": a circuit" if len(d["robust"]) >= 2 else
                                                                  ": not called a circuit")
        lines.append(f"| {_title(task)} | {', '.join(d['circuit']['heads'])} | "
                     f"{'yes' if d['reached_target'] else 'no (most faithful k shown)'} "
                     f"({d['selection']['faithfulness']:.2f}) | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Held-out faithfulness under each convention, with its 95% bootstrap interval. Faithfulness above 1 "
              "means the head set alone gives a larger logit difference than the full model (other heads pull "
              "against the answer).", ""]
    per = {}
    for name, v in steps.items():  # "discover <task>: <method>" -> wall seconds
        if name.startswith("discover ") and ": " in name:
            task, method = name[len("discover "):].split(": ", 1)
            per.setdefault(task, []).append(f"{method} {v['wall']:.1f}")
    if per:
        lines += ["Time per method (s): " + "; ".join(f"{_title(k)}: " + ", ".join(v) for k, v in per.items()), ""]
    return lines


def _scoring_md(scoring: dict) -> list[str]:
    if not scoring:
        return []
    if "skipped" in scoring:
        return _skipped_md("MAPS head scores (parameters only)", scoring)
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
        r_text = f"{_f(rr['without_context'])} / {_f(rr['with_context'])}" if rr else "not run (skip: dynamic)"
        lines.append(f"| {rel} | {r['k']} | {r['pairs_used']}/{r['pairs_total']} | {top} | {sup} | {r_text} |")
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
            lines.append(f"| {rel} | — | — | — | {'skipped: ' + c['skipped'] if c else 'not run (skip: causal_check)'} "
                         "| | | |")
            continue
        s = c["summary"]
        ctrl = "; ".join(f"{k}: {v[0]:.2f} -> {v[1]:.2f}" for k, v in s["control_top1_accuracy"].items()) or \
            f"none qualified ({len(c['control_candidates'])} considered)"
        er = c["extra_random"]
        extra = f"{er['top1_accuracy_mean']:.2f}, p = {er['p_value']:.3g} ({er['n_draws']} sets)" if er.get("n_draws") \
            else er.get("note", "—")
        live = s.get("random_heads_live_fraction")
        lines.append(f"| {rel} | {c['prompts']} | {c['m']} | {', '.join(c['top']['heads'])} | "
                     f"{s['clean_top1_accuracy']:.2f} -> {s['top_top1_accuracy']:.2f} "
                     f"| {_f(s.get('random_top1_accuracy'))}" + (f" ({live:.0%} of the drawn heads live)" if live is not None
                                                                and live < 1 else "") + f" | {ctrl} | {extra} |")
    lines += ["", "m follows MAPS's rule (50 heads for gpt2-medium's 384); on models so small that the rule would "
              "ablate more than a quarter of the heads, gpt2-medium's ratio (3 of the embedded model's 24).", ""]
    return lines


def _overlap_md(overlap: dict) -> list[str]:
    from .overlap import TestRow, test_table

    if overlap and "skipped" in overlap:
        return _skipped_md("Overlap and reuse", overlap)
    if not overlap or not overlap.get("table"):
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
    lines += _plan_md(s.get("settings", {}))
    lines += _tasks_md(base) + _discovery_md(s.get("discovery", {}), s.get("step_seconds", {}).get("discovery", {}))
    lines += _scoring_md(s.get("scoring", {}))
    lines += _overlap_md(s.get("overlap", {}))
    lines += ["## Figures", ""]
    for name, fig in s.get("figures", {}).items():
        lines += [f"![{fig['caption']}]({fig['file']})", "", f"*{fig['caption']}*", ""]
    t, c = s["timings_seconds"], s.get("cpu_seconds", {})
    lines += ["Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
              + (" (CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in c.items()) + ")" if c else "")
              + f"; peak memory {s['peak_rss_gib']:.2f} GiB"
              + (f"; resumed sections: {', '.join(s['resumed_sections'])}" if s.get("resumed_sections") else "") + ".", ""]
    return "\n".join(lines)


def _plan_md(settings: dict) -> list[str]:
    plan = settings.get("plan")
    if not plan:
        return []
    causal = "every pair" if plan["causal_prompts"] is None else f"at most {plan['causal_prompts']}"
    reuse = plan["n_prompts"] if plan["reuse_prompts"] is None else plan["reuse_prompts"]
    lines = ["## How much work", "",
             f"Prompts per task: {plan['n_prompts']} for the baseline, {plan['discovery_prompts']} selection and as "
             f"many held-out prompts for circuit discovery, {reuse} for the cross-task ablations; MAPS's causal check: "
             f"{causal} per relation, {plan['causal_random']} layer-matched random head sets; cross-task ablation: "
             f"{plan['n_random']} random head sets. Why these counts: {plan['rule']} (circuitlib.report.report_plan)."]
    if plan.get("screen") is not None or plan.get("max_k") is not None:
        lines.append(
            "Circuit discovery on this many heads: "
            + (f"activation patching of every head exactly, path patching only of the {plan['screen']} heads with "
               "the largest |activation patching| effect (the other heads get no path-patching score); "
               if plan.get("screen") is not None else "every head patched exactly by every method; ")
            + (f"the faithfulness curve on a coarse grid of k up to {plan['max_k']}, stopped at the first k reaching "
               "the target and refined by bisection (a head set of more heads is not sought)."
               if plan.get("max_k") is not None else "the faithfulness curve over every k.")
            + " Set both to 0 (--plan screen=0 --plan max_k=0) for the exhaustive version.")
    if settings.get("skip"):
        lines.append(f"Left out on request: {', '.join(settings['skip'])}.")
    return lines + [""]
