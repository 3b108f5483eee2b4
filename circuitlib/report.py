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
        from .interventions import show_progress

        with forward_counter(self.ctx.model, name, self.ctx.bars), show_progress(self.ctx.bars):
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


def head_set_label(task: str) -> str:
    """The legend label of ``task``'s discovered head set: the same text in every figure of the report."""
    return f"{_title(task)} head set (circuit discovery)"


def mark_styles(tasks: Sequence[str], extra: Sequence[str] = ()) -> dict[str, int]:
    """Marker style (index into :data:`circuitlib.plots.MARK_STYLES`) per legend label: each task's head set
    by the task's place in ``tasks`` (registry order), then the ``extra`` labels (e.g. published heads) after
    them. Every figure of the report passes this, so a head set has one marker everywhere."""
    styles = {head_set_label(t): i for i, t in enumerate(tasks)}
    styles.update({label: len(tasks) + j for j, label in enumerate(extra)})
    return styles


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
    ctx.save_figure(patching_figure(ctx, found), "patching_heads", "Per-head activation patching effect per task "
                    "(noising: 1 = replacing the head's output by its output on the corrupted prompt costs the whole "
                    "logit difference, 0 = costs nothing, negative = the head works against the answer); each panel "
                    "marks the head set discovery chose for its task.")
    return out


def patching_figure(ctx: Context, found: Sequence[str]):
    """Per-head activation patching, one panel per task, each marking its own task's head set."""
    from . import plots

    return plots.head_heatmaps(
        [ctx.patching[t] for t in found], vmin=-1.0, vmax=1.0, cmap=plots.DIVERGING_CMAP,
        panel_marks=[{head_set_label(t): ctx.circuits[t]} for t in found],
        titles=[_title(t) for t in found],  # the suptitle names the method
        cbar_label="patching effect (1 - normalised logit diff)", mark_styles=mark_styles(ctx.tasks),
        suptitle=f"{ctx.model.cfg.model_name}: per-head activation patching (noising)",
    )


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
    relation as title, the score's name (and k) on each colour bar, marks with their source in the legend
    (each task's head set in its own marker, :func:`mark_styles`; published heads in the next one)."""
    from . import plots

    marks = _reference_marks(ctx)
    fig = plots.head_heatmaps(
        [HeadScores.from_dict(summary[r][kind]) for r in shown], marks=marks,
        titles=[plots.pretty_name(r) for r in shown], vmin=0.0, vmax=1.0, annotate=False if ctx.big_grid else None,
        cbar_label=score_name, mark_styles=mark_styles(ctx.tasks, [m for m in marks if m not in
                                                                    {head_set_label(t) for t in ctx.tasks}]),
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
    live = set(result.to_dict()["live_heads"])
    for key, pair in result.pairs.items():
        if "maps_topk_curve" in pair:
            a, b = key.split("|")
            ra, rb = ctx.relation_of(a), ctx.relation_of(b)
            k_info = informative_k([rel[a], rel[b]], live)
            n_all = ctx.model.cfg.n_layers * ctx.model.cfg.n_heads
            fig = plots.topk_overlap_plot(pair["maps_topk_curve"], informative_up_to=k_info if k_info < n_all else None,
                                          title=f"MAPS top-k heads shared: {plots.pretty_name(ra)} vs {plots.pretty_name(rb)}")
            caption = (f"Heads shared by the top-k MAPS heads of {plots.pretty_name(ra)} and {plots.pretty_name(rb)}, "
                       "against chance (k² / N) and the ceiling (k); filled points: p < 0.05 for that k alone "
                       "(hypergeometric, not corrected for the many k shown).")
            if k_info < n_all:
                caption += (f" Only {len(live)} of the {n_all} heads are live; up to k = {k_info} both top-k sets hold "
                            "only live heads scoring above every switched-off head. Beyond that (shaded), switched-off "
                            "heads with near-zero scores enter the rankings, and their order carries no information.")
            ctx.save_figure(fig, f"topk_overlap_{a}_{b}", caption)
    shown = [t for t in tasks if t in rel]
    if len(shown) >= 2:
        ctx.save_figure(other_tasks_figure(ctx, rel, shown), "maps_other_tasks",
                        "Each task's MAPS relation scores with the other tasks' head sets marked (does MAPS find "
                        "another task's heads?); markers as in every figure."
                        + (" " + ", ".join(_title(t) for t in tasks if t not in rel) + " has no MAPS relation: no panel, "
                           "its head set marked on the others." if any(t not in rel for t in tasks) else ""))
    return result.to_dict()


def informative_k(scores: Sequence[HeadScores], live: set[str]) -> int:
    """The largest k for which every scoring's top-k heads are live heads scoring strictly above every
    switched-off head of that scoring (all heads when every head is live)."""
    ks = []
    for hs in scores:
        values = {f"{l}.{h}": float(hs[(l, h)]) for l in range(hs.n_layers) for h in range(hs.n_heads)}
        dead = [v for name, v in values.items() if name not in live]
        if not dead:
            ks.append(len(values))
            continue
        ks.append(sum(1 for name, v in values.items() if name in live and v > max(dead)))
    return min(ks)


def other_tasks_figure(ctx: Context, rel: dict[str, HeadScores], shown: Sequence[str]):
    """Each shown task's relation scores, marking the head sets of every *other* task with one (tasks
    without a MAPS relation, such as Colored Objects, have no panel but their head sets are marked)."""
    from . import plots

    return plots.head_heatmaps(
        [rel[t] for t in shown], titles=[plots.pretty_name(rel[t].target) for t in shown],
        panel_marks=[{head_set_label(o): c for o, c in ctx.circuits.items() if o != t} for t in shown],
        cbar_label="MAPS static score (fraction of pairs in top-k)", mark_styles=mark_styles(ctx.tasks),
        suptitle="MAPS scores with the other tasks' head sets marked")


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
    return {head_set_label(t): c for t, c in ctx.circuits.items()}


def _marks_caption(ctx: Context) -> str:
    published = reference_entry(ctx.model.cfg.model_name)
    if published:
        return f"marked: {published['label']}"
    if ctx.circuits:
        return "the head sets circuit discovery found marked (each task's in its own marker, as in every figure)"
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


def _n(count: int, one: str, many: str | None = None) -> str:
    """``1 set``, ``2 sets``: a count with its noun in the right number."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _rel(relation: str) -> str:
    """A MAPS relation's display name (as in the figures' titles)."""
    from .plots import pretty_name

    return pretty_name(relation)


METHOD_LABELS = {"act_patch": "activation patching", "attribution": "attribution patching",
                 "path_patch": "path patching", "faithfulness": "faithfulness curve (selection prompts)",
                 "heldout": "held-out faithfulness (every convention)"}
STATISTIC_LABELS = {"size_intersection": "shared heads", "rho": "Spearman ρ", "auroc": "AUROC",
                    "normalised": "normalised logit diff"}


def _convention_md(name: str, ablation: dict) -> str:
    """What one ablation convention does to every head outside the head set, from its stored spec."""
    where = "every position" + ("" if ablation.get("positions") == "all" else " (END only)")
    bos = ("the BOS position is ablated too and enters the means" if ablation.get("bos")
           else "the BOS position is left alone")
    ref = f"the {ablation.get('reference', 'corrupt')}ed prompts".replace("corrupted", "corrupted").replace(
        "cleaned", "clean")
    kind = ablation.get("kind")
    if kind == "zero":
        what = "replaced by 0"
    elif kind == "resample":
        what = (f"replaced by its output on another of {ref} with the same template (a seeded shuffle within each "
                "template)")
    elif ablation.get("means") == "template":
        what = f"replaced, position by position, by its mean over {ref} of the same template (Wang et al.'s IOI convention)"
    else:
        what = f"replaced by its mean over all real positions of {ref}"
    return f"*{name}*: {what}, at {where}; {bos}"


def _live(s: dict) -> set[str] | None:
    overlap = s.get("overlap") or {}
    return set(overlap["live_heads"]) if overlap.get("live_heads") else None


def _top_live(heads: list[dict], live: set[str] | None, n: int = 3) -> list[dict]:
    """The first ``n`` of a stored top-heads list with a positive score, switched-off heads left out."""
    return [h for h in heads if h["score"] > 0 and (live is None or h["head"] in live)][:n]


def _summary_md(s: dict) -> list[str]:
    """A few sentences generated from the results: what a reader should take away, with its numbers."""
    disc = s.get("discovery") or {}
    scoring = s.get("scoring") or {}
    overlap = s.get("overlap") or {}
    live = _live(s)
    lines = ["## Summary", ""]
    done = {t: d for t, d in disc.items() if isinstance(d, dict) and "circuit" in d} if "skipped" not in disc else {}
    for t, d in done.items():
        heads, held = d["circuit"]["heads"], d["heldout"]
        values = [h["faithfulness"] for h in held.values()]
        reach, n_conv = d["robust"], len(held)
        target = d["meta"]["target"]
        text = (f"- **{_title(t)}**: circuit discovery's head set is {', '.join(heads)} ({_n(len(heads), 'head')}). On "
                f"{d['meta']['n_heldout']} held-out prompts it keeps {min(values):.2f}–{max(values):.2f} of the full "
                f"model's logit difference across the {n_conv} ablation conventions and reaches the {target:.0%} target "
                f"under {len(reach)} of {n_conv}")
        if len(reach) == n_conv:
            text += ": a circuit under every convention."
        elif len(reach) >= 2:
            missed = [c for c in held if c not in reach]
            text += (f" ({', '.join(reach)}): a circuit by this report's rule (at least 2 conventions), but "
                     f"**convention-dependent**: below the target under {', '.join(missed)}.")
        else:
            text += (f" ({', '.join(reach)})" if reach else "") + ": not called a circuit (it needs at least 2)."
        if not d["reached_target"]:
            text += " It did not reach the target on the selection prompts either (the most faithful k is shown)."
        lines.append(text)
    if scoring and "skipped" not in scoring:
        tops = {r: _top_live(v["top_heads"], live) for r, v in scoring.items()}
        lines.append("- **MAPS (parameters only)**: top heads " + "; ".join(
            f"for {_rel(r)}: {', '.join(h['head'] for h in top) or 'none with a positive score'}"
            for r, top in tops.items()) + ("" if live is not None else
                                             " (switched-off heads not identified: the overlap section did not run)") + ".")
        for t, d in done.items():
            r = TASK_SPECS[t].relation if t in TASK_SPECS else None
            if r not in tops:
                continue
            heads, top = d["circuit"]["heads"], [h["head"] for h in tops[r]]
            inside = [h for h in heads if h in top]
            text = (f"  - {_title(t)}'s head set: {'all' if len(inside) == len(heads) and len(heads) > 1 else len(inside)} "
                    f"of its {_n(len(heads), 'head')} among the top {len(top)} for {_rel(r)}")
            scores = {(h["head"]): h["score"] for h in scoring[r]["top_heads"]}
            static = scoring[r]["static"]
            outside = [h for h in heads if h not in top]
            if outside:
                sup = [h["head"] for h in _top_live(scoring[r]["top_suppression_heads"], live)]
                parts = []
                for h in outside[:5]:
                    lh = [int(x) for x in h.split(".")]
                    score = scores.get(h, static["scores"][lh[0]][lh[1]])
                    parts.append(f"{h} scores {score:.2f}" + (" and is a top *suppression* head, "
                                 f"{next(x['score'] for x in scoring[r]['top_suppression_heads'] if x['head'] == h):.2f}"
                                 if h in sup else ""))
                text += " (" + "; ".join(parts) + ")"
            lines.append(text + ".")
        checks = {r: v["causal_check"]["summary"] for r, v in scoring.items()
                  if v.get("causal_check") and "skipped" not in v["causal_check"]}
        if checks:
            lines.append("- **MAPS's causal check**: zero-ablating each relation's top MAPS heads at the last position "
                         "takes top-1 accuracy " + ", ".join(
                             f"{c['clean_top1_accuracy']:.2f} -> {c['top_top1_accuracy']:.2f} ({_rel(r)}, "
                             f"{_n(c['m'], 'head')})" for r, c in checks.items()) + ".")
    if overlap.get("table"):
        rows = overlap["table"]["rows"]
        sig = [r for r in rows if r["significant"]]
        unreach = [r for r in rows if not r["can_reach"]]
        tasks = list(overlap.get("tasks") or done)
        text = (f"- **Overlap and reuse**: one family of {_n(len(rows), 'test')}, Holm-corrected: "
                + (f"{len(sig)} significant (" + "; ".join(
                    f"{_test_name(r['name'], tasks)}: {STATISTIC_LABELS.get(r['statistic'], r['statistic'])} = "
                    f"{_value(r['value'])}, p = {r['p']:.2g}, Holm p = {r['adjusted_p']:.2g}" for r in sig) + ")"
                   if sig else "none significant")
                + f"; {len(unreach)} of the {len(rows)} cannot reach significance at this number of heads, whatever "
                "the data.")
        if overlap.get("apart"):
            text += (f" {_n(overlap['apart']['n_tests'], 'cross-task ablation row')} "
                     f"{'is' if overlap['apart']['n_tests'] == 1 else 'are'} reported apart from the family "
                     "(too few random head sets exist for a test).")
        lines.append(text)
    return lines + [""] if len(lines) > 2 else []


def _value(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


TEST_PATTERNS: list[tuple[str, str]] = [  # reuse.py's row names -> readable names ({a}, {b}: tasks or relations)
    (r"circuits (?P<a>\S+) vs (?P<b>\S+): shared heads", "{A} and {B} head sets: heads in common"),
    (r"\|patching\| (?P<a>\S+) vs (?P<b>\S+): Spearman \(live heads\)",
     "{A} vs {B}: |activation patching| effects, rank agreement over the live heads"),
    (r"MAPS (?P<ra>\S+) vs (?P<rb>\S+): Spearman \(live heads\)",
     "MAPS scores, {RA} vs {RB}: rank agreement over the live heads"),
    (r"MAPS (?P<ra>\S+) vs (?P<rb>\S+): top-(?P<k>\d+) heads shared", "MAPS top-{k} heads, {RA} vs {RB}: heads in common"),
    (r"(?P<a>\S+): MAPS (?P<ra>\S+) vs \|patching\|: Spearman \(live heads\)",
     "{A}: MAPS {RA} scores vs |activation patching|, rank agreement over the live heads"),
    (r"(?P<a>\S+): circuit heads' MAPS (?P<ra>\S+) scores: AUROC(?P<live> \(live heads\))?",
     "{A}: do the head set's heads score higher under MAPS {RA} than the other{live} heads?"),
    (r"remove (?P<a>\S+) circuit -> (?P<b>\S+): normalised logit diff vs random sets",
     "remove the {A} head set, measure {B}: normalised logit diff vs random head sets"),
]


def _parse_test(name: str) -> tuple[str, dict] | None:
    import re

    for pattern, readable in TEST_PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            return readable, m.groupdict()
    return None


def _test_name(name: str, tasks: Sequence[str] = ()) -> str:
    """A test row's readable name: task ids -> task titles, relation ids -> display names."""
    parsed = _parse_test(name)
    if parsed is None:
        return name
    readable, g = parsed
    return readable.format(A=_title(g.get("a") or ""), B=_title(g.get("b") or ""), RA=_rel(g.get("ra") or ""),
                           RB=_rel(g.get("rb") or ""), k=g.get("k"), live=" live" if g.get("live") else "")


def _reading(row: dict, overlap: dict, family: bool) -> str | None:
    """One plain sentence on a significant row, or on a row that cannot reach significance."""
    parsed = _parse_test(row["name"])
    g = parsed[1] if parsed else {}
    A, B = _title(g.get("a") or ""), _title(g.get("b") or "")
    RA, RB = _rel(g.get("ra") or ""), _rel(g.get("rb") or "")
    v, n = row["value"], row["n"]
    stat = row["statistic"]
    if stat == "rho":
        seen = (f"ρ = {v:.2f} over {n} heads: the two rank the heads "
                + ("alike" if v > 0.5 else "in opposite order" if v < -0.5 else "with little agreement"))
    elif stat == "size_intersection":
        seen = _n(int(v), "head")
    elif stat == "auroc":
        seen = (f"AUROC = {v:.2f} (1: every head-set head scores above every other head; 0.5: chance; "
                "0: below every other head)")
    else:
        seen = f"{STATISTIC_LABELS.get(stat, stat)} = {_value(v)}"
    subject = {
        "circuits": f"The {A} and {B} head sets", "|patching|": f"|Activation patching| on {A} and on {B}",
    }
    name = row["name"]
    if name.startswith("circuits "):
        who = f"The {A} and {B} head sets share {seen}"
    elif name.startswith("|patching|"):
        who = f"|Activation patching| on {A} and on {B}: {seen}"
    elif name.startswith("MAPS ") and stat == "rho":
        who = f"MAPS {RA} and {RB} scores: {seen}"
    elif name.startswith("MAPS "):
        who = f"The top-{g.get('k')} MAPS heads of {RA} and {RB} share {seen}"
    elif ": MAPS " in name:
        who = f"On {A}, MAPS {RA} scores and |activation patching|: {seen}"
    elif "AUROC" in name:
        who = f"{A}'s head set under MAPS {RA}: {seen}"
    else:
        who = f"{_test_name(name)}: {seen}"
    del subject
    if family and row["significant"]:
        return (f"- *Significant*: {who} (p = {row['p']:.2g}, {row['how']}; {row['adjusted_p']:.2g} after Holm).")
    if family and not row["can_reach"]:
        return (f"- *Cannot reach significance*: {who}. Even the most extreme outcome at n = {n} gives "
                f"p = {row['min_p']:.2g}, which would not pass the Holm bar here; the row can show nothing either way.")
    return None


def _how(text: str) -> str:
    import re

    return re.sub(r"\b1 random draws\b", "1 random draw", text)


def _test_table_md(rows: list[dict], tasks: Sequence[str], *, family: bool) -> list[str]:
    head = "| test | statistic | value | p | how p was obtained | n | smallest possible p |"
    rule = "|---|---|---|---|---|---|---|"
    if family:
        head += " p (Holm) | significant | can reach |"
        rule += "---|---|---|"
    out = [head, rule]
    for r in rows:
        cells = [_test_name(r["name"], tasks).replace("|", "\\|"), STATISTIC_LABELS.get(r["statistic"], r["statistic"]),
                 _value(r["value"]), f"{r['p']:.3g}", _how(r["how"]), str(r["n"]), f"{r['min_p']:.3g}"]
        if family:
            cells += [f"{r['adjusted_p']:.3g}", "yes" if r["significant"] else "no", "yes" if r["can_reach"] else "no"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _tasks_md(base: dict) -> list[str]:
    splits = {r.get("split") for r in base["tasks"].values()}
    split_text = {
        "heldout": "All prompts come from the **held-out split**: combinations that never occur in the embedded "
                   "model's training corpus (IOI: template and indirect object's name; Colored Objects: template, "
                   "surface and the queried object's place in the list; country -> capital: template and country).",
        "train": "The prompts come from the training split: combinations the embedded model saw in training.",
        "any": "The prompts mix seen and unseen combinations of template and answer.",
    }
    lines = ["## Tasks", "",
             "Each task has clean prompts and corrupted twins that differ in one token and change the answer. "
             "*Accuracy* is two-way: the answer's logit beats the competing answer's (IOI: the indirect object beats "
             "the subject; Colored Objects: the queried object's colour beats the colour the corrupted question asks "
             "for; Country -> capital: the capital beats the corrupted country's capital), so chance is 0.5. "
             "*Top-1 accuracy*: the answer is the model's first choice over the whole vocabulary. *Logit difference*: "
             "answer minus competitor at the last position, on the clean and the corrupted prompts. "
             + " ".join(split_text[x] for x in sorted(s for s in splits if s in split_text)), "",
             "| task | what it asks | prompts | split | accuracy | top-1 accuracy | logit diff clean | logit diff corrupt |",
             "|---|---|---|---|---|---|---|---|"]
    split_name = {"heldout": "held out", "train": "training", "any": "any", None: "none"}
    for task, r in base["tasks"].items():
        what = TASK_SPECS[task].description if task in TASK_SPECS else ""
        lines.append(f"| {_title(task)} | {what} | {r['n_prompts']} | {split_name.get(r['split'], r['split'])} "
                     f"| {r['accuracy']:.3f} | {r['top1_accuracy']:.3f} | {r['logit_diff']:.2f} "
                     f"| {r['corrupt_logit_diff']:.2f} |")
    valid = [r for r in base["relations"] if r["valid"]]
    return lines + ["", "## Relations", "",
                    f"MAPS scores heads per *relation*: a list of (source, target) word pairs. {len(valid)} of "
                    f"{len(base['relations'])} MAPS relations keep at least 30 pairs whose source and target are single "
                    "tokens for this tokenizer (MAPS's filter): "
                    + ", ".join(f"{r['relation']} ({r['kept']} of {r['total']} pairs; written \"{_rel(r['relation'])}\" "
                                "below)" for r in valid) + ".", ""]


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
    conventions = first["heldout"]
    lines = ["## Circuit discovery", "",
             "Every head is scored by **activation patching** (noising: the clean prompt runs, and one head's output "
             "at every position is replaced by its output on the corrupted prompt; the score is the fraction of the "
             "logit difference lost, so 1 = the head carries it all, 0 = nothing, negative = the head works against "
             "the answer), by attribution patching (a gradient approximation of the same)"
             + (" and by path patching to the logits (only the head's direct path to the output is patched). "
                if "path_patch" in first["scores"] else " (path patching left out on request). ") +
             f"The **head set** is the smallest top-k by |activation patching| whose **faithfulness** reaches "
             f"{target:.0%} on the selection prompts. Faithfulness: every head *outside* the "
             "set is ablated (its output replaced, see the conventions below), and the remaining logit difference is "
             "divided by the full model's; 1 = the set alone does what the model does. The set is then measured again "
             f"on **held-out** prompts (disjoint from the selection prompts; a held-out prompt whose text is also a "
             f"selection prompt is dropped, so a task with few distinct prompts has fewer) under {len(conventions)} "
             "ablation conventions, with 95% bootstrap intervals over prompts. A head set is called a **circuit** only "
             "when it reaches the target on held-out prompts under at least two conventions.", "",
             "| task | prompts (selection / held out) | head set | reached target (selection) | " + " | ".join(conventions)
             + " | conventions reaching the target |", "|" + "---|" * (5 + len(conventions))]
    for task, d in disc.items():
        if "skipped" in d:
            lines.append(f"| {_title(task)} | | {d['skipped']} |" + " |" * (2 + len(conventions)))
            continue
        cells = [f"{h['faithfulness']:.2f} [{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]" for h in d["heldout"].values()]
        verdict = f"{len(d['robust'])} of {len(d['heldout'])}" + (": a circuit" if len(d["robust"]) >= 2 else
                                                                  ": not called a circuit")
        lines.append(f"| {_title(task)} | {d['meta']['n_selection']} / {d['meta']['n_heldout']} "
                     f"| {', '.join(d['circuit']['heads'])} | "
                     f"{'yes' if d['reached_target'] else 'no (most faithful k shown)'} "
                     f"({d['selection']['faithfulness']:.2f}) | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", "Each cell: held-out faithfulness [95% bootstrap interval]. Faithfulness above 1 means the head set "
              "alone gives a larger logit difference than the full model (ablated heads pulled against the answer). "
              "The conventions differ in what replaces the output (`hook_z`, the attention-weighted values before "
              "W_O) of every head outside the set; means and resamples come from the corrupted prompts:", ""]
    lines += [f"- {_convention_md(name, h['ablation'])}." for name, h in conventions.items()]
    lines.append("")
    per = {}
    for name, v in steps.items():  # "discover <task>: <method>" -> wall seconds
        if name.startswith("discover ") and ": " in name:
            task, method = name[len("discover "):].split(": ", 1)
            per.setdefault(task, []).append(f"{METHOD_LABELS.get(method, method)} {v['wall']:.1f}")
    if per:
        lines += ["Time per method (wall seconds): " + "; ".join(f"{_title(k)}: " + ", ".join(v)
                                                                 for k, v in per.items()) + ".", ""]
    return lines


def _scoring_md(scoring: dict, live: set[str] | None) -> list[str]:
    if not scoring:
        return []
    if "skipped" in scoring:
        return _skipped_md("MAPS head scores (parameters only)", scoring)
    first = next(iter(scoring.values()))
    meta = first["static"].get("meta", {})
    dyn_meta = next((v["dynamic_with_context"]["meta"] for v in scoring.values() if v.get("dynamic_with_context")), None)
    inputs = meta.get("inputs", "")
    lines = ["## MAPS head scores (parameters only)", "",
             "A head's **static score** for a relation is the fraction of its (source, target) pairs for which the "
             "head's OV circuit maps the source token to the target among its top-k vocabulary entries "
             "(k = 1 for copying relations, 10 otherwise): m = x_s W_V W_O W_U, computed from the weights alone, no "
             "forward pass. **x_s** is the source token's input to the head: "
             + (f"here {inputs}" if inputs else "W_E[s]") + ". W_E[s] is the source token's row of the embedding "
             "matrix" + ("; MLP_0(LN2_0(W_E[s])) is block 0's MLP applied to it after block 0's second LayerNorm (the "
                         "MLP's output alone, as the MAPS authors do)" if "MLP_0" in inputs else "")
             + ". No positional embedding, no LayerNorm in "
             "front of W_V, no biases, no final LayerNorm. The *suppression* score asks the same of -m (the head "
             "pushes the target down)."]
    if dyn_meta:
        used, dropped = dyn_meta.get("templates", []), dyn_meta.get("templates_dropped", {})
        lines[-1] += (" *Dynamic* scores apply the same test to what the head actually writes at the last position "
                      "of **neutral prompts**: MAPS's experiment-1 templates filled with each source word ("
                      + ", ".join(f'"{t}"' for t in used) + "".join(
                          f"; dropped ({why}): " + ", ".join(f'"{t}"' for t, w in dropped.items() if w == why)
                          for why in dict.fromkeys(dropped.values())) + "). *With context* is the normal "
                      "forward pass; *without context* forces the head's attention at the last position onto the "
                      "source word. r is the Pearson correlation of dynamic and static scores over all heads "
                      "(pooled over templates).")
    lines.append("")
    if live is not None and any(h["head"] not in live for v in scoring.values()
                                for h in v["top_heads"][:3] + v["top_suppression_heads"][:3]):
        lines += [f"Top heads are listed among the {len(live)} live heads only: the other heads are switched off "
                  "(their OV weights are ~0, see the overlap section) and their tiny scores are noise.", ""]
    lines += ["| relation | k | pairs | top heads (score) | top suppression heads | r static-dynamic (without / with context) |",
              "|---|---|---|---|---|---|"]
    low = []
    for rel, r in scoring.items():
        top = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in _top_live(r["top_heads"], live)) or "none > 0"
        sup = ", ".join(f"{h['head']} ({h['score']:.2f})" for h in _top_live(r["top_suppression_heads"], live)) or "none > 0"
        rr = r["r_static_dynamic"]
        r_text = f"{_f(rr['without_context'])} / {_f(rr['with_context'])}" if rr else "not run (skip: dynamic)"
        if rr and rr.get("with_context") is not None and rr["with_context"] < 0.5:
            low.append(f"{_rel(rel)} ({rr['with_context']:.2f})")
        lines.append(f"| {_rel(rel)} | {r['k']} | {r['pairs_used']} of {r['pairs_total']} | {top} | {sup} | {r_text} |")
    lines.append("")
    if low:
        lines += [f"**Low with-context r** ({', '.join(low)}): with context, a head's output at the last position "
                  "depends on where it attends, not only on its OV map, so a low r says the heads do not write the "
                  "source's target *at that position of these prompts*; it does not say their OV maps lack the "
                  "relation. Notebook 03 (§3, \"Why the with-context scores are ~0 on this model\") works this out "
                  "for the embedded model.", ""]
    lines += _causal_md(scoring)
    return lines


def _causal_md(scoring: dict) -> list[str]:
    checks = [v["causal_check"] for v in scoring.values() if v.get("causal_check") and "skipped" not in v["causal_check"]]
    m_rule = checks[0]["m_rule"] if checks else ""
    lines = ["### MAPS's causal check", "",
             "As the MAPS authors run it: the relation's top heads by static score (only heads with a positive "
             "score), best first, are **zero-ablated** cumulatively at the last position of the relation's prompts, "
             "and top-1 accuracy is tracked. **m** is the number of heads ablated: MAPS's rule (50 heads for "
             "gpt2-medium's 384); on models so small that the rule would ablate more than a quarter of the heads, "
             "gpt2-medium's ratio" + (f". Here: {m_rule}" if m_rule else "") + ". Baselines: as many random heads "
             "(MAPS: 5 draws from all heads except the relation's), and the relation's heads ablated on *other* "
             "relations' prompts (MAPS's control: relations sharing < 15% of the heads, clean accuracy within 0.2). "
             "circuitlib adds random **live** heads, layer-matched where the layers allow, with an empirical p-value "
             "(1 + number of sets at least as harmful) / (1 + number of sets).", "",
             "| relation | prompts | m | heads | top-1 clean -> heads ablated | random heads (MAPS) | controls "
             "| random live heads (mean top-1, p) |", "|---|---|---|---|---|---|---|---|"]
    for rel, r in scoring.items():
        c = r.get("causal_check")
        if not c or "skipped" in c:
            lines.append(f"| {_rel(rel)} | — | — | — | {'skipped: ' + c['skipped'] if c else 'not run (skip: causal_check)'} "
                         "| | | |")
            continue
        s = c["summary"]
        ctrl = "; ".join(f"{_rel(k)}: {v[0]:.2f} -> {v[1]:.2f}" for k, v in s["control_top1_accuracy"].items()) or \
            f"none qualified ({len(c['control_candidates'])} considered)"
        er = c["extra_random"]
        n = er.get("n_draws") or 0
        if n and 1 / (n + 1) > 0.05:
            extra = (f"{er['top1_accuracy_mean']:.2f}; not testable: only {_n(n, 'random live-head set')} "
                     f"{'exists' if n == 1 else 'exist'}" if er.get("exhaustive") else
                     f"{er['top1_accuracy_mean']:.2f}; not testable: {_n(n, 'draw')}, p >= {1 / (n + 1):.2g}")
        elif n:
            extra = f"{er['top1_accuracy_mean']:.2f}, p = {er['p_value']:.3g} ({_n(n, 'set')})"
        else:
            extra = er.get("note", "—")
        live_frac = s.get("random_heads_live_fraction")
        prompts = f"{c['n_prompts']}, {c['prompts']}" if c.get("n_prompts") else c["prompts"]
        lines.append(f"| {_rel(rel)} | {prompts} | {c['m']} | {', '.join(c['top']['heads'])} | "
                     f"{s['clean_top1_accuracy']:.2f} -> {s['top_top1_accuracy']:.2f} "
                     f"| {_f(s.get('random_top1_accuracy'))}" + (f" ({live_frac:.0%} of the drawn heads live)"
                                                                if live_frac is not None and live_frac < 1 else "")
                     + f" | {ctrl} | {extra} |")
    return lines + [""]


def _note_md(note: str, tasks: Sequence[str]) -> str:
    import re

    m = re.fullmatch(r"remove (\S+) circuit -> (\S+): (.*)", note)
    if m:
        return f"Removing the {_title(m[1])} head set, measured on {_title(m[2])}: {m[3]}"
    return note[:1].upper() + note[1:]


def _overlap_md(overlap: dict) -> list[str]:
    if overlap and "skipped" in overlap:
        return _skipped_md("Overlap and reuse", overlap)
    if not overlap or not overlap.get("table"):
        return []
    tab = overlap["table"]
    tasks = list(overlap.get("tasks") or [])
    n_live = len(overlap["live_heads"])
    lines = ["## Overlap and reuse", "",
             "Do the tasks' head sets share heads, do MAPS scores find the heads causal discovery finds, and does "
             "removing one task's head set hurt another task? All tests form **one family**, corrected together "
             f"(Holm). Rank statistics use only the **live heads** ({n_live} of them: heads whose OV weights are not "
             "switched off), because dead heads tie at zero and would make any two scorings look alike. *Shared heads*: "
             "how many heads two sets have in common (tested against drawing the sets at random, hypergeometric). "
             "*Spearman ρ*: rank correlation of two per-head scorings (1 = same order). *AUROC*: the chance that a head "
             "of the head set scores higher than a head outside it (1 = all above, 0.5 = chance). p-values are exact "
             "(all permutations / labellings, or hypergeometric) where feasible, else Monte Carlo with >= 20,000 "
             "permutations. *Smallest possible p*: the p the most extreme data could give at this n; *p (Holm)*: p "
             f"adjusted over the {tab['n_tests']} rows; *significant*: adjusted p <= {tab['alpha']:g}; *can reach*: "
             "whether the row would be significant at its smallest possible p, the other rows as observed ('no': the "
             "test cannot show anything at this n, whatever the data).", "",
             *_test_table_md(tab["rows"], tasks, family=True), ""]
    lines += _paper_pair_md(overlap, tasks)
    readings = [x for x in (_reading(r, overlap, True) for r in tab["rows"]) if x]
    if readings:
        lines += ["How to read it:", "", *readings, ""]
    if overlap.get("apart"):
        ap = overlap["apart"]
        lines += ["**Kept apart from the family**: cross-task ablations, where one task's head set is mean-ablated "
                  "and another task is measured, against random sets of as many live heads. The *normalised logit "
                  "diff* is (x - corrupted) / (clean - corrupted): 1 = the task is untouched, 0 = as bad as the "
                  "corrupted prompts. These rows have too few random sets for their p to pass a corrected bar, so "
                  "they are reported, not tested:", "", *_test_table_md(ap["rows"], tasks, family=False), ""]
        reuse = overlap.get("reuse") or {}
        for r in ap["rows"]:
            parsed = _parse_test(r["name"])
            if not parsed or "a" not in parsed[1] or "b" not in parsed[1]:
                continue
            c, t = parsed[1]["a"], parsed[1]["b"]
            cell = reuse.get(c, {}).get(t)
            if not cell:
                continue
            lines.append(f"- Removing the {_title(c)} head set leaves {_title(t)} at {cell['ablated']['normalised']:.2f} "
                         f"(random live-head sets of the same size: {cell['random_mean']['normalised']:.2f} on average, "
                         f"{_n(cell['n_random'], 'set')}{', every one that exists' if cell.get('exhaustive') else ''}).")
        lines.append("")
    notes = overlap.get("notes", [])
    if notes:
        lines += ["Notes:", ""] + [f"- {_note_md(n, tasks)}" for n in notes] + [""]
    return lines


def _paper_pair_md(overlap: dict, tasks: Sequence[str]) -> list[str]:
    """IOI vs Colored Objects as Merullo et al. (2024) compare them (shared heads, share of each head set,
    each head set removed on the other task), then every other task against both; empty when the analysis
    lacks the pair."""
    from .reuse import PAPER_PAIR, pair_reuse

    a, b = PAPER_PAIR
    if a not in tasks or b not in tasks:
        return []

    def share(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0%}"

    def removal(p, first: bool) -> str:
        c, t = (p.a, p.b) if first else (p.b, p.a)
        v, r, n = (p.remove_a_on_b, p.random_a_on_b, p.n_random_a_on_b) if first else \
            (p.remove_b_on_a, p.random_b_on_a, p.n_random_b_on_a)
        if v is None:
            return f"removing the {_title(c)} head set was not measured on {_title(t)}"
        rnd = f" (random live-head sets of the same size: {r:.2f}, {_n(n, 'set')})" if r is not None else \
            " (no random live-head set could be drawn)"
        return f"removing the {_title(c)} head set leaves {_title(t)} at {v:.2f}{rnd}"

    def sentence(p) -> str:
        shared = ", ".join(p.shared) or "none"
        return (f"the {_title(p.a)} and {_title(p.b)} head sets ({p.size_a} and {p.size_b} heads) share "
                f"{len(p.shared)} ({shared}): {share(p.share_of_a)} of {_title(p.a)}'s, {share(p.share_of_b)} of "
                f"{_title(p.b)}'s (hypergeometric p = {p.p_value:.3g}, uncorrected; the family row above is "
                f"corrected); {removal(p, True)}; {removal(p, False)}.")

    main = pair_reuse(overlap, a, b)
    lines = [f"**{_title(a)} vs {_title(b)}**, the comparison of Merullo et al. (2024), who report about a 78% overlap "
             "in in-circuit attention heads between the two tasks on GPT-2 medium: here " + sentence(main), ""]
    others = [t for t in tasks if t not in (a, b)]
    for t in others:
        texts = [sentence(pair_reuse(overlap, x, t)) for x in (a, b)]
        lines += [f"**{_title(t)}**, the third task, against each: " + " ".join(x[:1].upper() + x[1:] for x in texts), ""]
    return lines


def render_markdown(s: dict) -> str:
    """report.md from a summary (so a resumed run renders the same)."""
    base = s["baseline"]
    m = base["model"]
    lines = [f"# circuitlib report: {m['name']}", "",
             f"{m['n_layers']} layers x {m['n_heads']} heads, d_model {m['d_model']}, vocabulary {m['d_vocab']}"
             f"{', attention-only' if m['attn_only'] else ''}; {m['n_params']:,} parameters. Weights unprocessed "
             "(no LayerNorm folding), as MAPS uses them. Heads are named layer.head (1.6 = layer 1, head 6). The "
             "report asks which heads carry each task (circuit discovery, by intervening on the model), which heads "
             "MAPS finds from the weights alone, and whether the two agree.", ""]
    lines += _summary_md(s)
    lines += _plan_md(s.get("settings", {}), m)
    lines += _tasks_md(base) + _discovery_md(s.get("discovery", {}), s.get("step_seconds", {}).get("discovery", {}))
    lines += _scoring_md(s.get("scoring", {}), _live(s))
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


def _plan_md(settings: dict, model: dict | None = None) -> list[str]:
    plan = settings.get("plan")
    if not plan:
        return []
    causal = "every pair" if plan["causal_prompts"] is None else f"at most {plan['causal_prompts']}"
    reuse = plan["n_prompts"] if plan["reuse_prompts"] is None else plan["reuse_prompts"]
    rule = plan.get("rule", "")
    given = rule.split("; given: ", 1)[1] if "; given: " in rule else ""
    if model:
        n_heads = model["n_layers"] * model["n_heads"]
        why = (f"The model has {n_heads} heads (<= {BIG_MODEL_HEADS}), so every count is at its full value; models "
               f"with more than {BIG_MODEL_HEADS} heads get smaller counts, because each of their forward passes costs "
               "far more (circuitlib.report.report_plan)." if n_heads <= BIG_MODEL_HEADS else
               f"The model has {n_heads} heads (> {BIG_MODEL_HEADS}), so it gets the smaller big-model counts: each of "
               "its forward passes costs far more than on a small model (circuitlib.report.report_plan).")
    else:
        why = f"Why these counts: {rule} (circuitlib.report.report_plan)."
    lines = ["## How much work", "",
             f"Prompts per task: {plan['n_prompts']} for the baseline, {plan['discovery_prompts']} selection prompts and "
             f"at most as many held-out prompts for circuit discovery, {reuse} for the cross-task ablations; MAPS's "
             f"causal check: {causal} per relation, up to {plan['causal_random']} random live-head sets; cross-task ablation: "
             f"{plan['n_random']} random head sets (fewer when fewer exist). {why}"
             + (f" Set by hand for this run: {given}." if given else "")]
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
