"""Figures: they draw what they are given (values, marks at the right cells), and nothing is clipped."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuitlib import plots
from circuitlib.types import Circuit, HeadScores


@pytest.fixture(scope="module")
def small_model():
    """A random-weight model of the embedded model's shape, with its word-level tokenizer."""
    from circuitlib.models import build_model
    from circuitlib.toy.corpus import build_tokenizer
    from circuitlib.toy.train import CONFIG

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return build_model(dict(CONFIG, d_vocab=len(tokenizer.get_vocab())), tokenizer).eval()


def _scores(n_layers, n_heads, target, seed=0, model="m"):
    g = torch.Generator().manual_seed(seed)
    return HeadScores(torch.rand(n_layers, n_heads, generator=g), "maps_static", target, model, k=1)


def _inside_figure(fig) -> None:
    """Every visible text artist (ticks, labels, titles, legend) lies within the saved canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for text in fig.findobj(matplotlib.text.Text):
        if not text.get_visible() or not text.get_text():
            continue
        ext = text.get_window_extent(renderer)
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, f"{text.get_text()!r} clipped horizontally"
        assert ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, f"{text.get_text()!r} clipped vertically"


@pytest.mark.parametrize("shape", [(24, 16), (3, 8)])
def test_head_heatmaps_values_marks_and_layout(shape, tmp_path):
    a, b = _scores(*shape, "name_copying", 0), _scores(*shape, "country_to_capital_wikidata", 1)
    marks = {"movers": [(1, 2), "2.5"], "IOI circuit": Circuit.of(["0.0"], "ioi", "m")}
    fig = plots.head_heatmaps([a, b], marks, cbar_label="MAPS score: fraction of pairs in top-k")
    heat_axes = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
    assert len(heat_axes) == 2
    for ax, hs in zip(heat_axes, (a, b)):
        mesh = ax.collections[0]
        # the mesh holds scores as [head, layer] (layer on x): same numbers as the HeadScores
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(shape[1], shape[0]), hs.scores.T.numpy())
        assert mesh.norm.vmin == 0 and mesh.norm.vmax == 1  # shared scale
        # marks land in the marked cells: offsets fall inside [layer, layer+1) x [head, head+1)
        cells = set()
        for coll in ax.collections[1:]:
            cells |= {(int(np.floor(x)), int(np.floor(y))) for x, y in coll.get_offsets()}
        assert cells == {(1, 2), (2, 5), (0, 0)}
        assert len(ax.get_xticklabels()) == shape[0] and len(ax.get_yticklabels()) == shape[1]
    cbar_labels = {ax.get_ylabel() for ax in fig.axes} - {"head"}
    assert cbar_labels == {"MAPS score: fraction of pairs in top-k"}  # the quantity, not the task
    assert [ax.get_title() for ax in heat_axes] == ["Name copying", "Country to capital"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["movers", "IOI circuit"]
    _inside_figure(fig)
    fig.savefig(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    plt.close(fig)


def test_head_heatmaps_panel_marks_and_errors():
    a, b = _scores(3, 8, "name_copying"), _scores(3, 8, "country_to_capital_wikidata")
    fig = plots.head_heatmaps([a, b], panel_marks=[Circuit.of(["2.3"], "capitals", "m"), Circuit.of(["1.1"], "ioi", "m")])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Capitals circuit", "IOI circuit"]
    plt.close(fig)
    with pytest.raises(ValueError, match="outside the 3x8 grid"):
        plots.head_heatmaps(a, [(15, 14)])
    with pytest.raises(ValueError, match="same"):
        plots.head_heatmaps([a, _scores(2, 8, "x")])
    with pytest.raises(ValueError, match="one per panel"):
        plots.head_heatmaps([a, b], panel_marks=[[(0, 0)]])
    plt.close("all")


def test_patching_heatmap_is_centred():
    values = torch.tensor([[-2.0, 0.5, 1.0], [0.0, 0.3, -0.1]])
    fig = plots.patching_heatmap(values, row_labels=["L0", "L1"], col_labels=["BOS", "Mary", "John"], title="t")
    mesh = fig.axes[0].collections[0]
    assert mesh.norm.vmin == -2.0 and mesh.norm.vmax == 2.0  # symmetric about 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["BOS", "Mary", "John"]
    _inside_figure(fig)
    plt.close(fig)
    with pytest.raises(ValueError, match="col_labels"):
        plots.patching_heatmap(values, col_labels=["a"])


def test_scatter_scores_labels_top_heads_and_r():
    x = _scores(4, 4, "name_copying", 0)
    y = HeadScores(x.scores * 2 + 1, "maps_dynamic", "name_copying", "m", k=1)  # perfectly correlated
    fig = plots.scatter_scores(x, y, annotate_top=2)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r = 1.00"]
    assert {f"{l}.{h}" for l, h in x.top(2)} <= set(texts)
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 1], y.scores.flatten().numpy())
    plt.close(fig)


@pytest.mark.parametrize("corner", [(0.0, 1.0), (1.0, 1.0), (0.0, 0.0)])
def test_scatter_r_box_covers_no_point(corner):
    """A head alone in a corner (e.g. a causal head MAPS scores 0) must stay visible."""
    x = HeadScores(torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.3, "maps_static", "r", "m")
    x.scores[0, 0], y = corner[0], HeadScores(x.scores.clone(), "act_patch", "ioi", "m")
    y.scores[0, 0] = corner[1]
    fig = plots.scatter_scores(x, y)
    ax = fig.axes[0]
    fig.canvas.draw()
    box = ax.get_legend().get_window_extent()
    points = ax.transData.transform(ax.collections[0].get_offsets())
    assert not any(box.contains(px, py) for px, py in points)
    plt.close(fig)


def test_curve_and_topk_plots():
    x = np.arange(5)
    fig = plots.curve_plot(x, {"relation": 1 - x / 5, "random": np.ones((3, 5)) * 0.9}, baseline={"clean": 1.0})
    ax = fig.axes[0]
    assert len(ax.collections) == 1  # the std band of the [draws, x] curve only
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 1 - x / 5)
    plt.close(fig)
    with pytest.raises(ValueError, match="points"):
        plots.curve_plot(x, {"short": [1, 2]})
    curve = {"k": [1, 2, 3], "observed": [1, 1, 3], "expected": [0.1, 0.4, 0.9], "p_value": [0.01, 0.2, 0.001]}
    fig = plots.topk_overlap_plot(curve)
    filled, hollow = fig.axes[0].collections
    assert len(filled.get_offsets()) == 2 and len(hollow.get_offsets()) == 1
    plt.close(fig)


def test_attention_pattern_matches_cache(small_model):
    tokens = small_model.to_tokens("Mary and John", prepend_bos=True)[0]
    fig = plots.attention_pattern(small_model, tokens, 1, 2)
    _, cache = small_model.run_with_cache(tokens[None])
    drawn = np.ma.getdata(fig.axes[0].collections[0].get_array()).reshape(len(tokens), len(tokens))
    expect = cache["pattern", 1][0, 2].numpy()
    mask = np.tril(np.ones_like(expect, dtype=bool))
    np.testing.assert_allclose(drawn[mask], expect[mask], atol=1e-6)
    assert fig.axes[0].get_yticklabels()[0].get_text() == "BOS"
    plt.close(fig)
    with pytest.raises(ValueError, match="does not exist"):
        plots.attention_pattern(small_model, tokens, 9, 0)


def test_nbval_sanitizer_rounds_instead_of_truncating():
    from nbval_rounding import round_floats

    assert round_floats("faithfulness 0.4999") == round_floats("faithfulness 0.5001") == "faithfulness 0.50"
    assert round_floats("0.494") != round_floats("0.506")  # a change of ~0.01 shows
    assert round_floats("rho -0.0004, p 0.0056, head 1.6, 12.5") == "rho 0.00, p 0.01, head 1.6, 12.5"
    assert round_floats("v1.2.345 and 3.14159") == "v1.2.345 and 3.14"


def test_headscores_and_circuit_json_round_trips_keep_values_and_metadata():
    import json

    import torch

    from circuitlib.types import Circuit, HeadScores

    g = torch.Generator().manual_seed(0)
    hs = HeadScores(torch.rand(3, 8, generator=g), "maps_static", "name_copying", "toy", k=1,
                    meta={"pairs_used": 156, "note": "x", "nested": {"a": [1, 2]}})
    back = HeadScores.from_json(hs.to_json())
    assert (back.scores - hs.scores).abs().max() <= 5e-7  # to_dict stores 6 decimals
    assert (back.method, back.target, back.model, back.k, back.meta) == ("maps_static", "name_copying", "toy", 1, hs.meta)
    c = Circuit.of(["1.6", (0, 0)], "ioi", "toy", how="act_patch: top 2")
    c2 = Circuit.from_json(c.to_json())
    assert c2.heads == {(1, 6), (0, 0)} and (c2.task, c2.model, c2.how) == ("ioi", "toy", "act_patch: top 2")
    assert json.loads(c.to_json())["heads"] == ["0.0", "1.6"]


def test_a_label_keeps_its_marker_across_figures():
    """maps_other_circuit.png once swapped x / o against the other figures: styles follow the label."""
    import torch

    from circuitlib import plots
    from circuitlib.types import HeadScores

    hs = [HeadScores(torch.rand(3, 8), "maps_static", t, "toy") for t in ("name_copying", "country_to_capital_wikidata")]
    a = {"IOI head set": [(1, 6)], "Country -> capital head set": [(0, 0)]}

    def marker_of(fig, label):
        leg = fig.legends[0]
        handle = leg.legend_handles[[t.get_text() for t in leg.get_texts()].index(label)]
        return handle.get_paths()[0].vertices.round(3).tobytes(), tuple(handle.get_edgecolor()[0])

    f1 = plots.head_heatmaps(hs, a)
    f2 = plots.head_heatmaps(hs, panel_marks=[{"Country -> capital head set": [(0, 0)]}, {"IOI head set": [(1, 6)]}])
    for label in a:
        assert marker_of(f1, label) == marker_of(f2, label), label
    assert marker_of(f1, "IOI head set") != marker_of(f1, "Country -> capital head set")
    plt.close("all")


def test_path_patching_panels_hatch_heads_that_were_not_computed():
    """Path patching stores 0.0 for heads that were not senders; the heatmap shows them hatched and
    unlabelled ("not computed"), never as a measured 0.00. NaN scores likewise."""
    scores = torch.zeros(3, 8)
    scores[0, 1], scores[0, 2] = 0.5, -0.3
    senders = [f"0.{h}" for h in range(8)]  # layer 0 only: e.g. the senders into a layer-1 receiver
    path = HeadScores(scores, "path_patch", "ioi", "m", meta={"senders": senders})
    with_nan = HeadScores(torch.rand(3, 8, generator=torch.Generator().manual_seed(0)), "act_patch", "ioi", "m")
    with_nan.scores[2, 7] = float("nan")
    full = HeadScores(torch.rand(3, 8), "act_patch", "ioi", "m")
    fig = plots.head_heatmaps([path, with_nan, full], vmin=-1, vmax=1, cmap="RdBu_r", annotate=True)
    axes = [ax for ax in fig.axes if ax.get_xlabel() == "layer"]
    not_computed = [{(l, h) for l in (1, 2) for h in range(8)}, {(2, 7)}, set()]
    for ax, want in zip(axes, not_computed):
        mask = np.ma.getmaskarray(ax.collections[0].get_array()).reshape(8, 3)  # [head, layer]
        assert {(l, h) for h, l in zip(*np.nonzero(mask))} == want
        hatched = {(int(p.get_x()), int(p.get_y())) for p in ax.patches if p.get_hatch()}
        assert hatched == want
        labelled = {(int(t.get_position()[0]), int(t.get_position()[1])) for t in ax.texts}
        assert labelled == {(l, h) for l in range(3) for h in range(8)} - want  # no "0.00" on them
    assert "0.50" in [t.get_text() for t in axes[0].texts] and "-0.30" in [t.get_text() for t in axes[0].texts]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["not computed"]
    plt.close(fig)
    fig = plots.head_heatmaps(full)  # everything computed: no hatching, no legend
    assert not fig.legends and not [p for p in fig.axes[0].patches if p.get_hatch()]
    plt.close(fig)


def test_scatter_names_each_layer_in_a_discrete_legend():
    from matplotlib.colors import to_rgb
    from matplotlib.legend import Legend

    x, y = _scores(3, 4, "name_copying", 0), _scores(3, 4, "name_copying", 1)
    fig = plots.scatter_scores(x, y)
    ax = fig.axes[0]
    assert len(fig.axes) == 1  # no continuous colour bar
    (layers,) = [c for c in ax.get_children() if isinstance(c, Legend) and c is not ax.get_legend()]
    assert layers.get_title().get_text() == "layer"
    assert [t.get_text() for t in layers.get_texts()] == ["0", "1", "2"]
    colours = [to_rgb(h.get_markerfacecolor()) for h in layers.legend_handles]
    assert len(set(colours)) == 3
    fig.canvas.draw()
    box, legend_box = fig.bbox, layers.get_window_extent()
    assert legend_box.x0 >= ax.bbox.x1 and legend_box.x1 <= box.x1 + 1  # right of the axes, inside the figure
    points = ax.collections[0].get_facecolors()[:, :3]  # heads in order 0.0 .. 2.3: layer = index // 4
    for i, rgb in enumerate(points):
        np.testing.assert_allclose(rgb, colours[i // 4], atol=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"r = {np.corrcoef(x.scores.flatten(), y.scores.flatten())[0, 1]:.2f}"]
    plt.close(fig)
    many = _scores(24, 2, "name_copying", 0)  # too many layers for a legend: one colour band per layer
    fig = plots.scatter_scores(many, _scores(24, 2, "name_copying", 1))
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "layer"
    np.testing.assert_allclose(fig.axes[0].collections[0].norm.boundaries, np.arange(25) - 0.5)
    plt.close(fig)


def _label_boxes(fig):
    """Display-pixel boxes of every visible point label ("L.H" texts) in the drawn figure, per axes."""
    import re

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        boxes = []
        for t in ax.texts:
            if t.get_visible() and re.fullmatch(r"\d+\.\d+", t.get_text()):
                # the text's own box (Text, not Annotation: an annotation's extent includes its leader line)
                boxes.append((t.get_text(), matplotlib.text.Text.get_window_extent(t, renderer)))
        out.append((ax, boxes))
    return out


def _crowded_scores():
    """The toy model's situation: six live heads spread out, 18 dead heads piled up at the origin, two
    live heads close together ("0.4" and "0.5" near the origin)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, generator=g) * 0.02
    y = torch.rand(3, 8, generator=g) * 0.02
    x[0, :6] = torch.tensor([1.0, 0.62, 0.42, 0.0, 0.05, 0.06])
    y[0, :6] = torch.tensor([1.0, 0.26, 0.35, 0.0, 0.04, 0.05])
    return (HeadScores(x, "maps_static", "name_copying", "toy", k=1),
            HeadScores(y, "maps_dynamic_without_context", "name_copying", "toy", k=1))


@pytest.mark.parametrize("annotate_top,two_panels", [(5, False), (5, True), (24, False)])
def test_scatter_point_labels_never_overlap(annotate_top, two_panels, tmp_path):
    """Label boxes measured in the rendered figure: pairwise disjoint, inside the axes, and the labels
    are the heads asked for, each pointing (text or leader line) at its own point."""
    x, y = _crowded_scores()
    if two_panels:  # as notebooks 02 and 03 draw them: two scatters side by side in one figure
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4), layout="constrained")
        for ax in axes:
            plots.scatter_scores(x, y, annotate_top=annotate_top, diagonal=True, ax=ax)
    else:
        fig = plots.scatter_scores(x, y, annotate_top=annotate_top, diagonal=True)
    wanted = {f"{l}.{h}" for l, h in x.top(annotate_top) + y.top(annotate_top)}
    # without placement these overlap: 0.4 and 0.5 are 0.01 apart, the dead heads closer still
    naive = np.array([[x[(0, 4)], y[(0, 4)]], [x[(0, 5)], y[(0, 5)]]])
    for ax, boxes in _label_boxes(fig):
        if not ax.collections:
            continue
        assert {name for name, _ in boxes} == wanted  # every asked-for label shown (none hidden)
        assert len(boxes) == len(wanted)
        for i, (a_name, a) in enumerate(boxes):
            assert a.x0 >= ax.bbox.x0 - 0.5 and a.x1 <= ax.bbox.x1 + 0.5, f"{a_name} leaves the axes"
            assert a.y0 >= ax.bbox.y0 - 0.5 and a.y1 <= ax.bbox.y1 + 0.5, f"{a_name} leaves the axes"
            for b_name, b in boxes[i + 1:]:
                overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
                overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
                assert overlap_w <= 0 or overlap_h <= 0, f"labels {a_name} and {b_name} overlap"
        # each label is attached to its own head: its text or its visible leader line ends at the point
        for t in ax.texts:
            if t.get_visible() and t.get_text() in wanted:
                l, h = (int(v) for v in t.get_text().split("."))
                np.testing.assert_allclose(t.xy, (x[(l, h)], y[(l, h)]))
        near = ax.transData.transform(naive)
        assert np.hypot(*(near[0] - near[1])) < 8  # the two points really are closer than a label is wide
    fig.savefig(tmp_path / "scatter.png", dpi=150)  # another dpi: placement redone at draw time
    for ax, boxes in _label_boxes(fig):
        for i, (a_name, a) in enumerate(boxes):
            for b_name, b in boxes[i + 1:]:
                assert min(a.x1, b.x1) <= max(a.x0, b.x0) or min(a.y1, b.y1) <= max(a.y0, b.y0), (a_name, b_name)
    plt.close(fig)


def test_single_panel_legend_fits_in_the_figure():
    """One narrow panel with two labelled mark sets: the legend stacks instead of running off the canvas."""
    hs = _scores(3, 8, "name_copying")
    fig = plots.head_heatmaps(hs, {"Country -> capital head set": ["0.0"], "IOI head set": ["1.6"]})
    _inside_figure(fig)
    plt.close(fig)


def test_mark_styles_fix_each_label_s_marker_whatever_the_alphabet():
    """``mark_styles`` assigns markers explicitly: "b" gets MARK_STYLES[0] although "a" sorts first, in a figure
    that shows both and in one that shows "b" alone; labels not in it take the next free style."""
    from matplotlib.colors import to_rgba

    hs = [HeadScores(torch.rand(3, 8), "maps_static", t, "toy") for t in ("name_copying", "country_to_capital_wikidata")]

    def colour_of(fig, label):
        leg = fig.legends[0]
        handle = leg.legend_handles[[t.get_text() for t in leg.get_texts()].index(label)]
        face = handle.get_facecolor()
        return tuple(np.round(face[0] if len(face) and face[0][3] > 0 else handle.get_edgecolor()[0], 3))

    def want(i):
        return tuple(np.round(to_rgba(plots.MARK_STYLES[i][1]), 3))

    styles = {"b set": 0, "a set": 1}
    both = plots.head_heatmaps(hs, {"a set": [(0, 0)], "b set": [(1, 6)]}, mark_styles=styles)
    alone = plots.head_heatmaps(hs, {"b set": [(1, 6)]}, mark_styles=styles)
    extra = plots.head_heatmaps(hs, {"a set": [(0, 0)], "c set": [(2, 1)]}, mark_styles=styles)
    assert colour_of(both, "b set") == colour_of(alone, "b set") == want(0)
    assert colour_of(both, "a set") == colour_of(extra, "a set") == want(1)
    assert colour_of(extra, "c set") == want(2)  # the first style not taken by mark_styles
    assert [t.get_text() for t in both.legends[0].get_texts()] == ["b set", "a set"]  # legend in style order
    plt.close("all")


def test_topk_overlap_plot_shades_the_uninformative_k():
    curve = {"k": [1, 2, 3, 4, 5, 6], "observed": [1, 2, 2, 3, 5, 6], "expected": [k * k / 6 for k in range(1, 7)],
             "p_value": [0.2, 0.04, 0.3, 0.5, 0.6, 1.0]}
    fig = plots.topk_overlap_plot(curve, informative_up_to=3)
    ax = fig.axes[0]
    spans = [p for p in ax.patches if p.get_label().startswith("k > 3")]
    assert len(spans) == 1
    span = spans[0]  # a Rectangle (matplotlib >= 3.9) or a Polygon (older)
    x0, x1 = ((span.get_x(), span.get_x() + span.get_width()) if hasattr(span, "get_width")
              else (min(span.get_xy()[:, 0]), max(span.get_xy()[:, 0])))
    assert (x0, x1) == (3.5, 6.5)
    assert "k > 3: order carries no information" in [t.get_text() for t in ax.get_legend().get_texts()]
    none = plots.topk_overlap_plot(curve)
    assert not any(p.get_label().startswith("k >") for p in none.axes[0].patches)
    plt.close("all")
