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


SECTIONS: list[tuple[str, Callable[[Context], dict]]] = [
    ("baseline", section_baseline),
]


def run_report(model_name: str, out: str | Path, *, all_relations: bool = False, progress: bool = True) -> dict:
    """Run every section on ``model_name`` and write the report to ``out``; returns the summary."""
    from tqdm.auto import tqdm

    torch.manual_seed(SEED)
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
    for name, caption in ctx.figures.items():
        lines += [f"![{caption}]({name}.png)", "", f"*{caption}*", ""]
    lines += [f"Total time: {sum(s['timings_seconds'].values()):.1f}s.", ""]
    return "\n".join(lines)
