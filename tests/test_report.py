"""The report end to end on the embedded model (with fewer prompts and draws than the defaults, to stay
quick): determinism across runs, resuming after a deleted section file and after an interruption, the
markdown's prose and test family, skipping sections, the plan for big models, and the seed figure."""

import json
import re
import shutil
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch

from circuitlib import plots, report
from circuitlib.types import HeadScores

matplotlib.use("Agg")

SMALL = dict(N_PROMPTS=32, DISCOVERY_PROMPTS=16, CAUSAL_PROMPTS=32, CAUSAL_RANDOM=20, N_RANDOM=40)


def small_counts(monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setattr(report, name, value)


def results(summary: dict) -> dict:
    """A summary without what measures the run (times, memory, which sections were resumed)."""
    return {k: v for k, v in summary.items() if k not in report.RUN_ENTRIES}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    small_counts(mp)
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("report_a")
    try:
        summary = report.run_report("toy", out, progress=False)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out, summary


@pytest.fixture
def small(monkeypatch):
    small_counts(monkeypatch)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_report_runs_end_to_end_and_writes_everything(first_run):
    out, summary = first_run
    assert {"baseline", "discovery", "scoring", "overlap"} <= set(summary)
    assert summary["resumed_sections"] == []
    plan = summary["settings"]["plan"]
    assert (plan["n_prompts"], plan["discovery_prompts"], plan["n_random"]) == (32, 16, 40)
    assert plan["rule"].startswith("24 heads <= 100")
    on_disk = json.loads((out / "summary.json").read_text())
    assert results(on_disk) == json.loads(json.dumps(results(summary)))
    for name in summary["figures"]:
        assert (out / f"{name}.png").stat().st_size > 10_000
    for section in ("baseline", "discovery", "scoring", "overlap"):
        assert (out / "sections" / f"{section}.json").exists()
        assert summary["timings_seconds"][section] >= 0 and section in summary["cpu_seconds"]
    # timings live in step_seconds, not in the results
    assert all("timings" not in d for d in summary["discovery"].values())
    steps = summary["step_seconds"]
    assert "discover ioi: act_patch" in steps["discovery"] and "causal check name_copying" in steps["scoring"]
    assert summary["peak_rss_gib"] > 0


def test_report_md_has_every_section_and_the_test_family(first_run):
    out, summary = first_run
    md = (out / "report.md").read_text()
    assert md.startswith("# circuitlib report: toy")
    for heading in ("## How much work", "## Tasks", "## Relations", "## Circuit discovery",
                    "## MAPS head scores (parameters only)", "### MAPS's causal check", "## Overlap and reuse",
                    "## Figures"):
        assert heading in md, heading
    # each section's prose
    for words in ("Prompts per task: 32 for the baseline, 16 selection", "*Accuracy* is two-way",
                  "A head set is called a **circuit** only when", "A head's **static score**",
                  "As the MAPS authors run it", "All tests form **one family**",
                  "Time per method (wall seconds): IOI: activation patching"):
        assert words in md, words
    # the plan rule in words: 24 heads, at most BIG_MODEL_HEADS, so the full counts
    assert f"The model has 24 heads (<= {report.BIG_MODEL_HEADS}), so every count is at its full value" in md
    # the test family: the table of every test with its Holm-adjusted p, in readable names
    family = summary["overlap"]["table"]["rows"]
    table = _table_after(md, "## Overlap and reuse")
    assert family and table[0][:4] == ["test", "statistic", "value", "p"] and "p (Holm)" in table[0]
    assert len(table) - 2 == len(family)
    for row, cells in zip(family, table[2:]):
        assert cells[2] == (f"{row['value']:.3f}" if isinstance(row["value"], float) else str(row["value"]))
        assert cells[3] == f"{row['p']:.3g}" and cells[-2] == ("yes" if row["significant"] else "no")
        assert "_" not in cells[0] and "ioi" not in cells[0]  # no internal ids (IOI, Name copying, ...)
    assert {"shared heads", "Spearman ρ", "AUROC"} <= {cells[1] for cells in table[2:]}
    assert "Kept apart from the family" in md  # 40 draws < 2,000: the cross-task rows are reported apart


def _table_after(md: str, marker: str) -> list[list[str]]:
    """The first markdown table after ``marker``: rows of cells (header, rule, body); ``\\|`` stays in its cell."""
    import re

    lines = md.split(marker, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


def test_apart_rows_have_no_holm_columns(first_run):
    out, summary = first_run
    md = (out / "report.md").read_text()
    apart = summary["overlap"]["apart"]["rows"]
    assert apart  # 40 random draws: every cross-task row is kept apart
    table = _table_after(md, "**Kept apart from the family**")
    assert table[0] == ["test", "statistic", "value", "p", "how p was obtained", "n", "smallest possible p"]
    assert len(table) - 2 == len(apart) and all(len(r) == 7 for r in table)
    for row, cells in zip(apart, table[2:]):
        assert cells[3] == f"{row['p']:.3g}" and cells[5] == str(row["n"]) and cells[6] == f"{1 / (1 + row['n']):.3g}"
    section = md.split("**Kept apart from the family**", 1)[1].split("\n## ", 1)[0]
    assert "Holm" not in section.split("Notes:")[0] and "significant" not in section.split("Notes:")[0]
    assert not re.search(r"\b1 random draws\b|\b1 sets\b", md)  # singular after 1


def test_summary_numbers_are_the_results(first_run):
    """The Summary's numbers, recomputed here from summary.json: per task the held-out faithfulness range and how
    many conventions reach the target (faithfulness >= target), MAPS's top live heads, the family's significant
    rows and the rows that cannot reach significance."""
    from circuitlib.interventions import live_heads
    from circuitlib.models import load_model
    from circuitlib.tasks import TASK_SPECS

    out, s = first_run
    md = (out / "report.md").read_text()
    summ = md.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    for t, d in s["discovery"].items():
        values = [h["faithfulness"] for h in d["heldout"].values()]
        target = s["settings"]["target"]
        reach = [c for c, h in d["heldout"].items() if h["faithfulness"] >= target]
        line = next(x for x in summ.splitlines() if x.startswith(f"- **{TASK_SPECS[t].title}**"))
        m = re.search(r"head set is ([\d., ]+) \((\d+) heads?\)\. On (\d+) held-out prompts it keeps "
                      r"(-?\d+\.\d\d)–(-?\d+\.\d\d) .* the (\d+)% target under (\d) of (\d)", line)
        assert m, line
        assert m[1].split(", ") == d["circuit"]["heads"] and int(m[2]) == len(d["circuit"]["heads"])
        assert int(m[3]) == d["heldout"]["mean"]["n_prompts"]
        assert (m[4], m[5]) == (f"{min(values):.2f}", f"{max(values):.2f}")
        assert (int(m[6]), int(m[7]), int(m[8])) == (round(100 * target), len(reach), len(values))
        if len(reach) == len(values):
            assert "a circuit under every convention" in line
        elif len(reach) >= 2:
            assert "convention-dependent" in line and all(c in line for c in d["heldout"] if c not in reach)
        else:
            assert "not called a circuit" in line
    # MAPS top heads: positive score, switched-off heads (by the model's own weights) left out
    live = {f"{l}.{h}" for l, h in live_heads(load_model("toy"))}
    maps = next(x for x in summ.splitlines() if x.startswith("- **MAPS (parameters only)**"))
    for rel, r in s["scoring"].items():
        want = [h["head"] for h in r["top_heads"] if h["score"] > 0 and h["head"] in live][:3]
        assert f"for {plots.pretty_name(rel)}: {', '.join(want)}" in maps
    # the family: how many tests, which are significant (Holm over the p-values, recomputed here)
    rows = s["overlap"]["table"]["rows"]
    p = sorted(range(len(rows)), key=lambda i: rows[i]["p"])
    adjusted, running = [0.0] * len(rows), 0.0
    for rank, i in enumerate(p):
        running = max(running, min(1.0, (len(rows) - rank) * rows[i]["p"]))
        adjusted[i] = running
    significant = [i for i in range(len(rows)) if adjusted[i] <= 0.05]
    line = next(x for x in summ.splitlines() if x.startswith("- **Overlap and reuse**"))
    assert f"one family of {len(rows)} tests" in line
    assert (f"{len(significant)} significant" in line) if significant else ("none significant" in line)
    for i in significant:
        assert f"Holm p = {adjusted[i]:.2g}" in line
    cannot = sum(not r["can_reach"] for r in rows)
    assert f"{cannot} of the {len(rows)} cannot reach significance" in line


def test_ioi_vs_colored_objects_as_the_paper_compares_them(first_run):
    """The overlap section opens with IOI vs Colored Objects (Merullo et al. 2024), then capitals against each:
    shared heads and each head set's share recomputed here from the discovered head sets, the removals from
    the reuse cells."""
    out, s = first_run
    md = (out / "report.md").read_text()
    section = md.split("## Overlap and reuse\n", 1)[1].split("\n## ", 1)[0]
    heads = {t: set(d["circuit"]["heads"]) for t, d in s["discovery"].items()}
    titles = {"ioi": "IOI", "colored_objects": "Colored Objects", "capitals": "Country -> capital"}
    paper = next(x for x in section.splitlines() if x.startswith("**IOI vs Colored Objects**"))
    third = next(x for x in section.splitlines() if x.startswith("**Country -> capital**, the third task"))
    assert section.index(paper) < section.index(third)
    for line, pairs in ((paper, [("ioi", "colored_objects")]), (third, [("ioi", "capitals"), ("colored_objects", "capitals")])):
        for a, b in pairs:
            shared = sorted(heads[a] & heads[b], key=lambda h: tuple(map(int, h.split("."))))
            text = (f"the {titles[a]} and {titles[b]} head sets ({len(heads[a])} and {len(heads[b])} heads) share "
                    f"{len(shared)} ({', '.join(shared) or 'none'}): {len(shared) / len(heads[a]):.0%} of {titles[a]}'s, "
                    f"{len(shared) / len(heads[b]):.0%} of {titles[b]}'s")
            assert text.lower() in line.lower(), (text, line)
            for c, t in ((a, b), (b, a)):
                cell = s["overlap"]["reuse"][c][t]
                assert f"removing the {titles[c]} head set leaves {titles[t]} at {cell['ablated']['normalised']:.2f}" in line


def test_every_figure_marks_a_head_set_with_one_label_and_one_marker(first_run, tmp_path):
    """patching_heads, maps_static and maps_other_tasks: a task's head set has the same legend text and the same
    marker (MARK_STYLES by the task's place in the registry) in each; once maps_static said "... (activation
    patching)" and the others not, and markers followed the labels' alphabetical order."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from circuitlib.models import load_model
    from circuitlib.tasks import TASK_SPECS, report_tasks

    _, s = first_run
    ctx = report.Context(load_model("toy"), tmp_path, all_relations=False, plan={"n_prompts": 4, "n_random": 1},
                         skip=frozenset(), bars=False)
    report.restore_discovery(ctx, s["discovery"])
    report.restore_scoring(ctx, s["scoring"])
    tasks = list(report_tasks())
    shown = [r for r in report.FIGURE_RELATIONS if r in s["scoring"]]
    rel = {t: ctx.relation_scores[TASK_SPECS[t].relation] for t in tasks if TASK_SPECS[t].relation}
    assert len(rel) < len(tasks)  # a task without a MAPS relation (Colored Objects): its head set is still marked
    figures = {"patching_heads": report.patching_figure(ctx, tasks),
               "maps_static": report._maps_figure(ctx, s["scoring"], shown, "static", "MAPS static score", "x"),
               "maps_other_tasks": report.other_tasks_figure(ctx, rel, list(rel))}

    def marks(fig) -> dict[str, tuple]:
        leg = fig.legends[0]
        out = {}
        for text, handle in zip(leg.get_texts(), leg.legend_handles):
            filled = len(handle.get_facecolor()) and handle.get_facecolor()[0][3] > 0
            colour = handle.get_facecolor()[0] if filled else handle.get_edgecolor()[0]
            out[text.get_text()] = (handle.get_paths()[0].vertices.round(3).tobytes(), tuple(np.round(colour, 3)))
        return out

    seen = {name: marks(fig) for name, fig in figures.items()}
    labels = {name: set(m) for name, m in seen.items()}
    assert len({frozenset(v) for v in labels.values()}) == 1, labels  # the same label texts everywhere
    for i, t in enumerate(tasks):
        label = next(x for x in labels["patching_heads"] if x.startswith(TASK_SPECS[t].title + " head set"))
        styles = {name: m[label] for name, m in seen.items()}
        assert len(set(styles.values())) == 1, (t, styles)  # one marker in every figure
        marker, colour, _ = plots.MARK_STYLES[i]
        assert next(iter(styles.values()))[1] == tuple(np.round(to_rgba(colour), 3)), (t, marker)
    plt.close("all")


def test_same_seed_same_summary(first_run, small, tmp_path):
    _, a = first_run
    b = report.run_report("toy", tmp_path, progress=False)
    assert json.loads(json.dumps(results(a))) == json.loads(json.dumps(results(b)))


def test_resume_after_a_deleted_section_gives_the_same_summary(first_run, small, tmp_path):
    src, a = first_run
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    (tmp_path / "sections" / "scoring.json").unlink()
    b = report.run_report("toy", tmp_path, progress=False)
    assert b["resumed_sections"] == ["baseline", "discovery", "overlap"]
    assert json.loads(json.dumps(results(a))) == json.loads(json.dumps(results(b)))
    assert (tmp_path / "sections" / "scoring.json").exists()


def test_interrupted_report_resumes(first_run, small, tmp_path, monkeypatch):
    """Ctrl-C during the second task's discovery, then during the overlap section: each rerun resumes from
    what was finished (the first task's discovery, then whole sections) and the end result is the same."""
    from circuitlib import circuits
    from circuitlib.tasks import report_tasks

    _, a = first_run
    real = circuits.discover_circuit
    first, second = report_tasks()[:2]

    def interrupted_at_the_second_task(model, task, **kwargs):
        if task == second:
            raise KeyboardInterrupt
        return real(model, task, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(circuits, "discover_circuit", interrupted_at_the_second_task)
        with pytest.raises(KeyboardInterrupt):
            report.run_report("toy", tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "sections").iterdir()) == ["baseline.json", "discovery.parts"]
    assert [p.name for p in (tmp_path / "sections" / "discovery.parts").iterdir()] == [f"{first}.json"]

    def interrupted(ctx):
        raise KeyboardInterrupt  # as if Ctrl-C arrived during the overlap section

    sections = [(n, interrupted if n == "overlap" else f, r) for n, f, r in report.SECTIONS]
    with monkeypatch.context() as m:
        m.setattr(report, "SECTIONS", sections)
        with pytest.raises(KeyboardInterrupt):
            report.run_report("toy", tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "sections").iterdir()) == ["baseline.json", "discovery.json",
                                                                          "scoring.json"]
    assert not (tmp_path / "summary.json").exists()
    b = report.run_report("toy", tmp_path, progress=False)
    assert b["resumed_sections"] == ["baseline", "discovery", "scoring"]
    assert json.loads(json.dumps(results(a))) == json.loads(json.dumps(results(b)))
    # the discovery section that resumed its first task has that task's step timings too
    assert "discover ioi: act_patch" in b["step_seconds"]["discovery"]


def test_scoring_resumes_relation_by_relation(first_run, small, tmp_path, monkeypatch):
    from circuitlib import causal

    src, a = first_run
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    for name in ("scoring.json", "overlap.json"):
        (tmp_path / "sections" / name).unlink()
    real = causal.causal_check

    def interrupted_at_capitals(model, relation, **kwargs):
        if relation == "country_to_capital_wikidata":
            raise KeyboardInterrupt
        return real(model, relation, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(causal, "causal_check", interrupted_at_capitals)
        with pytest.raises(KeyboardInterrupt):
            report.run_report("toy", tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "sections" / "scoring.parts").iterdir()] == ["name_copying.json"]
    b = report.run_report("toy", tmp_path, progress=False)
    assert b["resumed_sections"] == ["baseline", "discovery", "scoring/name_copying"]
    assert json.loads(json.dumps(results(a))) == json.loads(json.dumps(results(b)))
    assert not (tmp_path / "sections" / "scoring.parts").exists()


def test_changed_plan_recomputes_only_what_it_affects(first_run, small, tmp_path, monkeypatch):
    src, a = first_run
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    b = report.run_report("toy", tmp_path, progress=False, n_random=41)
    assert b["resumed_sections"] == ["baseline", "discovery", "scoring"]  # only overlap uses n_random
    assert b["settings"]["plan"]["n_random"] == 41


def test_skipped_parts_are_recorded_and_dependents_skipped(small, tmp_path):
    s = report.run_report("toy", tmp_path, progress=False, skip=("discovery", "causal_check", "dynamic"))
    assert s["discovery"] == {"skipped": "left out (skip)"}
    assert "needs the discovery section" in s["overlap"]["skipped"]
    scores = s["scoring"]["name_copying"]
    assert scores["causal_check"] is None and scores["dynamic_with_context"] is None and scores["static"]
    md = (tmp_path / "report.md").read_text()
    assert "Not run: left out (skip)." in md and "Left out on request: causal_check, discovery, dynamic." in md
    assert "maps_static" in s["figures"]  # the seed figure needs scoring only
    with pytest.raises(ValueError, match="cannot skip"):
        report.run_report("toy", tmp_path, progress=False, skip=("everything",))


def test_plan_for_big_models():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def fake(layers, heads):  # a real model with that head grid, tiny otherwise
        return HookedTransformer(HookedTransformerConfig(n_layers=layers, n_heads=heads, d_model=2 * heads, d_head=2,
                                                         n_ctx=8, d_vocab=8, attn_only=True))

    small_plan = report.report_plan(fake(3, 8))
    assert small_plan["n_prompts"] == report.N_PROMPTS and small_plan["causal_prompts"] == report.CAUSAL_PROMPTS
    big = report.report_plan(fake(24, 16))  # gpt2-medium's 384 heads
    assert {k: big[k] for k in report.BIG_MODEL} == report.BIG_MODEL
    assert big["rule"].startswith("384 heads > 100")
    # discovery on 384 heads: path patching of activation patching's top 96 heads, curve capped at k = 96
    assert (big["screen"], big["max_k"]) == (96, 96) and (small_plan["screen"], small_plan["max_k"]) == (None, None)
    exhaustive = report.report_plan(fake(24, 16), {"screen": 0, "max_k": 0})
    assert (exhaustive["screen"], exhaustive["max_k"]) == (None, None)
    given = report.report_plan(fake(24, 16), {"discovery_prompts": 8, "n_random": None})
    assert given["discovery_prompts"] == 8 and given["n_random"] == report.BIG_MODEL["n_random"]
    with pytest.raises(ValueError, match="unknown plan entries"):
        report.report_plan(fake(3, 8), {"prompts": 3})


def test_progress_bars_stay_out_of_ci_logs(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert report.bars_enabled(True) is False
    assert report.bars_enabled("always") is True and report.bars_enabled(False) is False


def _gpt2_medium_grid():
    """A real HookedTransformer with gpt2-medium's name, head grid (24 x 16) and tokenizer, of tiny width."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuitlib.models import gpt2_tokenizer

    cfg = HookedTransformerConfig(n_layers=24, n_heads=16, d_model=32, d_head=2, d_mlp=32, n_ctx=64, d_vocab=50257,
                                  act_fn="gelu_new", normalization_type="LN", model_name="gpt2-medium", seed=0)
    model = HookedTransformer(cfg)
    model.set_tokenizer(gpt2_tokenizer(), default_padding_side="right")
    return model


def test_seed_figure_on_a_gpt2_medium_grid(tmp_path):
    """The two-panel MAPS figure at 24 x 16: layer on x, head on y, 0-1, the relation as title, the
    score's name on each colour bar, the reference heads' X marks with their source in the legend."""
    g = torch.Generator().manual_seed(0)
    summary = {r: {"k": k, "static": HeadScores(torch.rand(24, 16, generator=g), "maps_static", r, "gpt2-medium",
                                                k=k).to_dict()}
               for r, k in (("name_copying", 1), ("country_to_capital_wikidata", 10))}
    ctx = report.Context(_gpt2_medium_grid(), tmp_path, all_relations=False, plan={"n_prompts": 4, "n_random": 1},
                         skip=frozenset(), bars=False)
    assert ctx.big_grid and not ctx.circuits
    fig = report._maps_figure(ctx, summary, list(summary), "static", "MAPS static score", "fraction of pairs in top-k")
    panels = fig.axes[:2]
    assert [ax.get_title() for ax in panels] == ["Name copying", "Country to capital"]
    assert [ax.get_xlabel() for ax in panels] == ["layer", "layer"]
    assert all(ax.get_ylabel() == "head" for ax in panels)
    assert [ax.get_xlim() for ax in panels] == [(0, 24)] * 2 and [ax.get_ylim() for ax in panels] == [(16, 0)] * 2
    labels = [ax.collections[0].colorbar.ax.get_ylabel() for ax in panels]
    assert labels == ["MAPS static score (k = 1)", "MAPS static score (k = 10)"]
    assert all(ax.collections[0].get_clim() == (0.0, 1.0) for ax in panels)
    assert not any(ax.texts for ax in panels)  # no cell annotations at 24 x 16
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    ref = report.reference_entry("gpt2-medium")
    assert legend == [ref["label"]] and "Merullo et al." in legend[0]
    marked = sorted((round(x - 0.5), round(y - 0.5)) for x, y in panels[0].collections[1].get_offsets())
    assert marked == sorted(ref["heads"]) == [(15, 14), (16, 15), (17, 4), (18, 5), (19, 15)]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_reference_heads_say_whether_they_were_checked():
    ref = report.reference_entry("gpt2-medium")
    assert ref["status"] in ("checked against the paper", "as given, not yet checked against the paper")
    if ref["status"] != "checked against the paper":
        assert ref["status"] in ref["label"]
    assert report.reference_entry("toy") is None


def test_a_task_whose_discovery_fails_is_recorded_not_fatal(small, tmp_path, monkeypatch):
    from circuitlib import circuits

    def fails(model, task, **kwargs):
        raise ValueError(f"the clean and corrupt metrics are equal ({task})")

    monkeypatch.setattr(circuits, "discover_circuit", fails)
    s = report.run_report("toy", tmp_path, progress=False, skip=("causal_check", "dynamic"))
    assert s["discovery"]["ioi"] == {"skipped": "discovery failed: the clean and corrupt metrics are equal (ioi)"}
    assert s["overlap"] == {"skipped": "needs head sets of at least two report tasks; discovery found 0"}
    assert "patching_heads" not in s["figures"] and "maps_static" in s["figures"]
    md = (tmp_path / "report.md").read_text()
    assert "IOI: discovery failed: the clean and corrupt metrics are equal (ioi)." in md


def test_forward_counter_leaves_the_forward_pass_alone():
    """The counter is a forward hook on the embedding; a hook that returned tqdm's ``update()`` value would
    replace the embedding with ``True`` whenever the bar redraws (prompts would become indistinguishable)."""
    from circuitlib.models import load_model
    from circuitlib.tasks import task_batch

    model = load_model("toy")
    batch = task_batch("ioi", model.tokenizer, 8, seed=0)
    import time

    counted = []
    with torch.no_grad():
        plain = model(batch.clean)
        with report.forward_counter(model, "test", True):
            for _ in range(3):
                time.sleep(0.15)  # past tqdm's mininterval, so the bar redraws on the next update
                counted.append(model(batch.clean))
    assert all(torch.equal(plain, c) for c in counted)
    assert not model.embed._forward_hooks  # removed again


def test_baseline_reads_out_at_end_only_and_matches_full_logits(toy):
    """The baseline's END-only readout gives metrics.evaluate's numbers (full logits at every position)."""
    from circuitlib.metrics import evaluate
    from circuitlib.tasks import task_batch

    for task in ("ioi", "capitals"):
        b = task_batch(task, toy.tokenizer, 12, seed=3)
        want = evaluate(toy, b)
        for max_tokens in (4096, 3 * b.clean.shape[1]):  # one chunk; chunks of 3 prompts
            got = report.evaluate_end(toy, b, max_tokens=max_tokens)
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], abs=1e-5), (task, k)
