"""The report end to end on the embedded model (with fewer prompts and draws than the defaults, to stay
quick): determinism across runs, resuming after a deleted section file and after an interruption, the
markdown's prose and test family, skipping sections, the plan for big models, and the seed figure."""

import json
import shutil
from types import SimpleNamespace

import matplotlib
import pytest
import torch

from circuitlib import report
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
                  "As the MAPS authors run it", "All tests form **one family**", "Time per method (s): IOI:"):
        assert words in md, words
    # the test family: the table of every test with its Holm-adjusted p
    family = summary["overlap"]["table"]["rows"]
    assert family and "| test | statistic | value | p |" in md and "Holm correction over this table" in md
    for row in family:
        assert row["name"].replace("|", "\\|") in md
    assert "Kept apart from the family" in md  # 40 draws < 2,000: the cross-task rows are reported apart


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

    _, a = first_run
    real = circuits.discover_circuit

    def interrupted_at_capitals(model, task, **kwargs):
        if task == "capitals":
            raise KeyboardInterrupt
        return real(model, task, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(circuits, "discover_circuit", interrupted_at_capitals)
        with pytest.raises(KeyboardInterrupt):
            report.run_report("toy", tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "sections").iterdir()) == ["baseline.json", "discovery.parts"]
    assert [p.name for p in (tmp_path / "sections" / "discovery.parts").iterdir()] == ["ioi.json"]

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
