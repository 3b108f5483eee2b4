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
        assert item["top"] == top_mapped_tokens(model, best, item["source"], n=8)
        assert supp["top"] == top_mapped_tokens(model, best, item["source"], n=8, suppression=True)
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
