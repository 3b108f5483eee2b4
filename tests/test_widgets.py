"""The explorer's callbacks, called directly (no browser): right data, right errors, widgets wired."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from circuitlib.scoring import maps_inputs, static_scores, top_mapped_tokens
from circuitlib.tasks import capital_batch, ioi_batch
from circuitlib.types import HeadScores, head_name
from circuitlib.widgets import Explorer

RELATIONS = ("name_copying", "country_to_capital_wikidata")




@pytest.fixture(scope="module")
def model(toy):
    return toy




@pytest.fixture(scope="module")
def explorer(model):
    scores = {r: static_scores(model, r) for r in RELATIONS}
    batches = {"ioi": ioi_batch(model.tokenizer, 6, seed=0), "capitals": capital_batch(model.tokenizer, 6, seed=0)}
    return Explorer(model, scores, batches, n_sources=3, n_tokens=8)


def test_select_matches_scores_and_ov_view(explorer, model):
    relation = "country_to_capital_wikidata"
    hs = explorer.scores[relation]
    best = hs.top(1)[0]
    data = explorer.select(relation, best)
    assert data["rank"] == 1 and data["head"] == head_name(best) == explorer.heads(relation)[0]
    assert data["score"] == pytest.approx(hs[best], abs=1e-4) and data["k"] == hs.k
    assert len(data["ov"]) == len(data["suppression"]) == 3
    pairs = explorer.pairs(relation)
    layer, h = best
    for item, supp in zip(data["ov"], data["suppression"]):
        assert [tuple(t) for t in item["top"]] == top_mapped_tokens(model, best, item["source"], n=8)
        assert [tuple(t) for t in supp["top"]] == top_mapped_tokens(model, best, item["source"], n=8, suppression=True)
        # the target's rank, recomputed from m_s = x_s W_V W_O W_U over the whole vocabulary
        i = pairs.src_words.index(item["source"])
        assert pairs.tgt_words[i] == item["target"]
        m = maps_inputs(model, pairs.src[i : i + 1])[layer, 0] @ model.W_V[layer, h] @ model.W_O[layer, h] @ model.W_U
        rank = int((m > m[pairs.tgt[i]]).sum()) + 1
        assert item["target_rank"] == (rank if rank <= 8 else None)


def test_select_with_typed_sources_and_errors(explorer):
    word = explorer.pairs("name_copying").src_words[0]
    data = explorer.select("name_copying", "0.0", sources=[word])
    assert [d["source"] for d in data["ov"]] == [word] and data["ov"][0]["target"] == word
    with pytest.raises(ValueError, match="unknown relation"):
        explorer.select("no_such_relation", "0.0")
    with pytest.raises(ValueError, match="does not exist"):
        explorer.select("name_copying", "7.0")
    with pytest.raises(ValueError, match="no prompts"):
        explorer.attention("no_task", 0, "0.0")
    with pytest.raises(ValueError, match="out of range"):
        explorer.attention("ioi", 99, "0.0")


def test_attention_is_the_head_pattern_at_end(explorer, model):
    batch = explorer.batches["ioi"]
    data = explorer.attention("ioi", 2, "1.3")
    end = int(batch.end[2])
    assert len(data["end_attention"]) == len(data["tokens"]) == end + 1
    assert sum(data["end_attention"]) == pytest.approx(1.0, abs=1e-3)
    # same numbers as the padded batch's forward pass (causal attention ignores the right padding)
    _, cache = model.run_with_cache(batch.clean, names_filter="blocks.1.attn.hook_pattern")
    ref = cache["pattern", 1][2, 3, end, : end + 1]
    assert data["end_attention"] == pytest.approx(ref.tolist(), abs=1e-4)
    assert data["top_keys"][0][2] == pytest.approx(max(data["end_attention"]))
    assert set(data["positions"]) >= {"END", "IO", "S1", "S2"}


def test_figures(explorer):
    fig = explorer.heatmap("name_copying", "2.1")
    heat = fig.axes[0]
    (x, y), = heat.collections[1].get_offsets()
    assert (int(x), int(y)) == (2, 1)  # the marked cell
    plt.close(fig)
    fig = explorer.attention_figure("capitals", 1, (0, 4))
    assert "capitals prompt 1" in fig.axes[0].get_title()
    plt.close(fig)


def test_widget_callbacks_update_the_views(explorer):
    ui = explorer.widget
    assert ui is explorer.widget  # built once
    explorer.head_w.value = "2.2"
    assert "head <b>2.2</b>" in explorer.views_html.value
    explorer.relation_w.value = "name_copying"
    assert explorer.head_w.value == "2.2"  # the head survives a relation change
    assert "name_copying" in explorer.views_html.value
    explorer.task_w.value = "capitals"
    assert explorer.prompt_w.max == len(explorer.batches["capitals"]) - 1
    explorer.source_w.value = "notaword_xyz"
    assert "not a single token" in explorer.views_html.value  # shown, not raised
    explorer.source_w.value = ""
    plt.close("all")


def test_rejects_scores_of_another_model(model):
    wrong = HeadScores(torch.zeros(24, 16), "maps_static", "name_copying", "gpt2-medium")
    with pytest.raises(ValueError, match="computed on this model"):
        Explorer(model, {"name_copying": wrong})
    with pytest.raises(ValueError, match="at least one"):
        Explorer(model, {})


def test_attention_to_matches_the_per_prompt_view(explorer):
    hs = explorer.attention_to("ioi", "IO")
    batch = explorer.batches["ioi"]
    assert hs.scores.shape == (3, 8) and hs.target == "ioi: END -> IO"
    for head in [(0, 0), (2, 5)]:
        per_prompt = [explorer.attention("ioi", i, head)["end_attention"][int(batch.positions["IO"][i])]
                      for i in range(len(batch))]
        assert hs[head] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-3)
    with pytest.raises(ValueError, match="no position"):
        explorer.attention_to("capitals", "IO")
    # a scoring that is not a relation can be browsed: no OV samples, views still work
    both = Explorer(explorer.model, {"attention": hs}, explorer.batches)
    data = both.select("attention", hs.top(1)[0])
    assert data["rank"] == 1 and data["ov"] == []


def _logit_diff_at_end(logits, batch):
    rows = torch.arange(len(batch))
    last = logits[rows, batch.end]
    return (last[rows, batch.answer] - last[rows, batch.wrong]).mean().item()


@torch.no_grad()
def _patched_head(model, batch, head, direction):
    """Head patching written out with one plain hook: the head's hook_z at every position taken
    from the other run (noising: clean run, corrupted z; denoising: the reverse); normalised score."""
    layer, h = head
    clean = _logit_diff_at_end(model(batch.clean), batch)
    corrupt = _logit_diff_at_end(model(batch.corrupt), batch)
    base, source = (batch.clean, batch.corrupt) if direction == "noising" else (batch.corrupt, batch.clean)
    _, cache = model.run_with_cache(source, names_filter=f"blocks.{layer}.attn.hook_z")
    donor = cache[f"blocks.{layer}.attn.hook_z"]

    def hook(z, hook):
        z = z.clone()
        z[:, :, h] = donor[:, :, h]
        return z

    patched = _logit_diff_at_end(model.run_with_hooks(base, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]), batch)
    normalised = (patched - corrupt) / (clean - corrupt)
    return 1 - normalised if direction == "noising" else normalised


def test_patching_view_uses_the_registry_and_matches_plain_patching(model, monkeypatch):
    from circuitlib import circuits

    batches = {"ioi": ioi_batch(model.tokenizer, 6, seed=0)}
    ex = Explorer(model, {"name_copying": static_scores(model, "name_copying")}, batches, n_sources=2)
    # the plain-hook score of every head; the probe is the head with the second-largest |score| (a live head
    # whatever the checkpoint)
    plain = {(l, h): abs(_patched_head(model, batches["ioi"], (l, h), "noising")) for l in range(3) for h in range(8)}
    probe = sorted(plain, key=plain.get, reverse=True)[1]
    data = ex.patching("ioi", f"{probe[0]}.{probe[1]}")
    assert list(data["methods"]) == list(circuits.HEAD_SCORERS) and data["n_heads"] == 24
    act = data["methods"]["act_patch"]
    assert act["direction"] == "noising" and act["metric"] == "normalised_logit_diff"
    assert abs(act["score"]) == pytest.approx(plain[probe], abs=2e-3)
    assert act["score"] == pytest.approx(_patched_head(model, batches["ioi"], probe, "noising"), abs=2e-3)
    den = ex.patching("ioi", (0, 0), direction="denoising")["methods"]["act_patch"]
    assert den["direction"] == "denoising"
    assert den["score"] == pytest.approx(_patched_head(model, batches["ioi"], (0, 0), "denoising"), abs=2e-3)
    # rank by |score|: recomputed from the plain-hook scores of every head
    assert act["rank"] == 1 + sum(v > plain[probe] + 1e-3 for v in plain.values())

    # a method registered later shows up in the data and in the widget without changes to the explorer
    def spread(model, batch, *, direction, progress=False):
        return HeadScores(torch.arange(24.0).reshape(3, 8) - 20, "spread", batch.task, "toy",
                          meta={"direction": direction, "metric": "made up"})

    monkeypatch.setitem(circuits.HEAD_SCORERS, "spread_for_test", spread)
    row = ex.patching("ioi", "0.0")["methods"]["spread_for_test"]
    assert row == {"score": -20.0, "rank": 1, "direction": "noising", "metric": "made up"}
    assert ex.patching("ioi", "2.4")["methods"]["spread_for_test"]["rank"] == 24  # score 0: the smallest |score|
    ex.widget
    ex.head_w.value = "0.0"
    assert "spread_for_test" in ex.patching_html.value and "-20.00" in ex.patching_html.value
    ex.direction_w.value = "denoising"
    assert "denoising" in ex.patching_html.value
    with pytest.raises(ValueError, match="unknown head-scoring method"):
        ex.patching_scores("ioi", "no_such_method")
    plt.close("all")


def test_heatmap_names_the_quantity_without_internal_ids(explorer):
    for relation, words in (("name_copying", "MAPS score"), ("country_to_capital_wikidata", "MAPS score")):
        fig = explorer.heatmap(relation, "0.0")
        texts = [fig._suptitle.get_text(), fig.axes[0].get_title(), fig.axes[1].get_ylabel()]
        assert words in fig.axes[1].get_ylabel()  # the colour bar
        assert not any("maps_static" in t or "_" in t for t in texts), texts
        plt.close(fig)
    hs = explorer.attention_to("ioi", "S2")
    explorer.scores["to S2"] = hs
    try:
        fig = explorer.heatmap("to S2", "1.6")
        assert fig.axes[1].get_ylabel() == "mean attention weight"
        plt.close(fig)
    finally:
        del explorer.scores["to S2"]


def _png_pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def _shown(out):
    """The one figure an Output widget shows, as pixels (its ``outputs`` state, as the browser gets it)."""
    import base64

    assert len(out.outputs) == 1 and out.outputs[0]["output_type"] == "display_data", out.outputs
    return _png_pixels(base64.b64decode(out.outputs[0]["data"]["image/png"]))


def _rendered(fig):
    from IPython.core.pylabtools import print_figure  # how the inline backend renders a figure

    try:
        return _png_pixels(print_figure(fig, "png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def test_output_widgets_show_exactly_the_current_figures(explorer):
    """Each Output widget holds one PNG, the figure of the current choice: no capture of display
    messages, so nothing can land in the wrong widget or pile up."""
    import numpy as np

    explorer.widget
    explorer.task_w.value = "ioi"
    for relation, head, prompt in (("name_copying", "1.6", 0), ("country_to_capital_wikidata", "1.6", 2),
                                   ("country_to_capital_wikidata", "0.5", 2)):
        explorer.relation_w.value = relation
        explorer.head_w.value = head
        explorer.prompt_w.value = prompt
        np.testing.assert_array_equal(_shown(explorer.heatmap_out), _rendered(explorer.heatmap(relation, head)))
        np.testing.assert_array_equal(_shown(explorer.attention_out),
                                      _rendered(explorer.attention_figure("ioi", prompt, head)))
    other = _rendered(explorer.attention_figure("ioi", 2, "0.0"))
    assert _shown(explorer.attention_out).shape != other.shape or (_shown(explorer.attention_out) != other).any()
    assert plt.get_fignums() == []  # every figure drawn for the widget was closed
    explorer.prompt_w.value = 0


def test_scores_that_round_to_zero_never_print_minus_zero(model, monkeypatch):
    from circuitlib import circuits

    def tiny_negative(model, batch, *, direction, progress=False):
        values = torch.full((3, 8), -0.001)
        values[0, 0] = -0.5
        return HeadScores(values, "tiny", batch.task, "toy", meta={"direction": direction, "metric": "m"})

    monkeypatch.setitem(circuits.HEAD_SCORERS, "tiny_negative", tiny_negative)
    scores = {"neg": HeadScores(torch.full((3, 8), -0.001), "maps_static", "name_copying", "toy", k=1)}
    ex = Explorer(model, scores, {"ioi": ioi_batch(model.tokenizer, 4, seed=0)}, n_sources=1)
    ex.widget
    ex.head_w.value = "2.3"
    labels = [label for label, _ in ex.head_w.options]
    assert all(label.endswith("(0.00)") for label in labels), labels
    assert "score 0.00" in ex.views_html.value and "-0.00" not in ex.views_html.value
    assert "+0.00" in ex.patching_html.value and "-0.00" not in ex.patching_html.value
    ex.head_w.value = "0.0"
    assert "-0.50" in ex.patching_html.value  # a real negative score keeps its sign
    plt.close("all")


def test_views_are_typed_results_that_read_as_their_json(explorer, model, monkeypatch):
    """Attributes hold the typed rows; item access and to_json give the plain dicts the views once were;
    a scorer that fails on a task gets a row with only its error, shown in the widget; a bad source word
    leaves refresh() with no data and the error on screen."""
    import json

    from circuitlib import circuits
    from circuitlib.widgets import HeadView, MappedSource, MethodScore, PatchingView

    view = explorer.select("name_copying", "0.0")
    assert isinstance(view, HeadView) and all(isinstance(r, MappedSource) for r in view.ov)
    first = view.ov[0]
    assert view["ov"][0] == {"source": first.source, "target": first.target,
                             "top": [[t, v] for t, v in first.top], "target_rank": first.target_rank}
    assert json.loads(view.to_json())["head"] == "0.0" == view["head"]

    def broken(model, batch, *, direction, progress=False):
        raise ValueError("needs an S2 position")

    monkeypatch.setitem(circuits.HEAD_SCORERS, "broken_for_test", broken)
    data = explorer.patching("ioi", "1.6")
    assert isinstance(data, PatchingView) and data.methods["broken_for_test"] == MethodScore(error="needs an S2 position")
    assert data["methods"]["broken_for_test"] == {"error": "needs an S2 position"}
    assert "error" not in data["methods"]["act_patch"] and set(data["methods"]["act_patch"]) == {
        "score", "rank", "direction", "metric"}
    explorer.widget  # built once per explorer (an earlier test may have built it): redraw for the new scorer
    explorer.refresh()
    assert "needs an S2 position" in explorer.patching_html.value
    explorer.source_w.value = "zzzz not a word"
    assert explorer.refresh() is None and "color:#b00" in explorer.views_html.value
    explorer.source_w.value = ""
    assert isinstance(explorer.refresh(), HeadView)
