"""Figures: layer x head heatmaps with marked heads, patching grids, score scatters, curves, attention.

Every function draws with matplotlib (seaborn styling only), works under the Agg backend, takes an
optional ``ax`` / ``axes`` to draw into, and returns the :class:`~matplotlib.figure.Figure`.
Figures it creates itself use constrained layout, so labels are never clipped when saved with
``fig.savefig(path)``. Figures are made with pyplot (so notebooks show them); scripts that make
many should ``plt.close(fig)`` after saving.

Conventions: in head heatmaps layer is on x and head on y (head 0 at the top), as in MAPS;
colour = score, one shared scale for all panels.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import matplotlib.artist
import matplotlib.patheffects as pe
import matplotlib.text
import matplotlib.transforms
import matplotlib.pyplot as plt
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch, Rectangle
import numpy as np
import seaborn  # noqa: F401  (registers its colormaps, e.g. "mako", with matplotlib)
import torch
from jaxtyping import Int, Real
from matplotlib.figure import Figure
from torch import Tensor
from transformer_lens import HookedTransformer

from .types import Circuit, Head, HeadScores, head_name, parse_head

SEQUENTIAL_CMAP = "mako_r"  # light = 0, dark = 1: marks in warm colours stand out on every cell
DIVERGING_CMAP = "RdBu_r"
# (marker, colour, filled) per marker set, in the order the sets are given
MARK_STYLES = [("X", "#e4572e", True), ("o", "#f3a712", False), ("P", "#c03fbe", True), ("s", "#29bf12", False)]

PRETTY_NAMES = {
    "name_copying": "Name copying",
    "country_to_capital_wikidata": "Country to capital",
    "country_to_capital": "Country to capital",
    "ioi": "IOI",
    "colored_objects": "Colored Objects",
    "capitals": "Capitals",
}

METHOD_NAMES = {
    "maps_static": "MAPS static scores",
    "maps_suppression": "MAPS suppression scores",
    "act_patch": "activation patching",
    "attribution": "attribution patching",
    "path_patch": "path patching to the logits",
    "attribution_patch": "attribution patching",
    "act_patch_screened": "activation patching (screened)",
    "maps_dynamic_without_context": "MAPS dynamic scores (without context)",
    "maps_dynamic_with_context": "MAPS dynamic scores (with context)",
    "maps_dynamic_without_context_suppression": "MAPS dynamic suppression scores (without context)",
    "maps_dynamic_with_context_suppression": "MAPS dynamic suppression scores (with context)",
    "zero_ablation": "zero-ablation",
}

Marks = Iterable[Head | str] | Circuit | Mapping[str, Iterable[Head | str] | Circuit] | None


def pretty_name(target: str) -> str:
    """``"country_to_capital_wikidata"`` -> ``"Country to capital"``; unknown names de-underscored."""
    if target in PRETTY_NAMES:
        return PRETTY_NAMES[target]
    text = target.removesuffix("_wikidata").replace("_", " ")
    return text[:1].upper() + text[1:]


def _heads(spec: Iterable[Head | str] | Circuit) -> list[Head]:
    out = []
    for h in spec:
        out.append(parse_head(h) if isinstance(h, str) else (int(h[0]), int(h[1])))
    return out


def _mark_sets(marks: Marks, default_label: str | None) -> dict[str, list[Head]]:
    """Normalise ``marks`` to ``{label: [heads]}`` (a Circuit is called "<Task> circuit" by default)."""
    if marks is None:
        return {}
    if isinstance(marks, Mapping):
        return {str(label): _heads(heads) for label, heads in marks.items()}
    if isinstance(marks, Circuit):
        return {default_label or f"{pretty_name(marks.task)} circuit": _heads(marks)}
    return {default_label or "reference heads": _heads(marks)}


NOT_COMPUTED = "not computed"  # legend label of hatched cells (a score that was never computed, not a 0)


def _not_computed_style() -> dict[str, Any]:
    return dict(facecolor="white", edgecolor="0.72", hatch="////", linewidth=0)


def computed_mask(hs: HeadScores) -> np.ndarray | None:
    """``[n_layers, n_heads]`` booleans, False where ``hs`` holds no computed score, or ``None`` when
    every head was computed. Not computed: a NaN score, and for path patching every head that was not
    a sender (``meta["senders"]``; path patching stores 0.0 there, which a heatmap must not show as a
    measured 0.00: e.g. heads in the receiver's layer and later, and the receiver itself)."""
    mask = ~np.isnan(hs.scores.detach().float().cpu().numpy())
    senders = hs.meta.get("senders") if isinstance(hs.meta, Mapping) else None
    if senders is not None:
        listed = np.zeros_like(mask)
        for name in senders:
            l, h = parse_head(name) if isinstance(name, str) else (int(name[0]), int(name[1]))
            listed[l, h] = True
        mask &= listed
    return None if mask.all() else mask


def _tick_step(n: int, max_labels: int = 32) -> int:
    return max(1, int(np.ceil(n / max_labels)))


def _new_figure(n_panels: int, panel_w: float, panel_h: float, extra_h: float = 0.0):
    fig, axes = plt.subplots(
        1, n_panels, figsize=(panel_w * n_panels, panel_h + extra_h), layout="constrained", squeeze=False
    )
    return fig, list(axes[0])


def head_heatmaps(
    scores: HeadScores | Sequence[HeadScores],
    marks: Marks = None,
    *,
    panel_marks: Sequence[Marks] | None = None,
    titles: Sequence[str] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = SEQUENTIAL_CMAP,
    mark_label: str | None = None,
    annotate: bool | None = None,
    suptitle: str | None = None,
    cbar_label: str | None = None,
    mark_styles: Mapping[str, int] | None = None,
    axes: Sequence[Any] | None = None,
) -> Figure:
    """Layer x head heatmaps side by side (the MAPS figure), with X marks on chosen heads.

    ``scores``: one panel per :class:`HeadScores`, all on the scale ``[vmin, vmax]``; each colour bar
    is labelled ``cbar_label`` (name the quantity, e.g. "MAPS score: fraction of pairs in top-k";
    default: the score's method, by its readable name). ``marks`` go on every panel: heads as
    ``(layer, head)`` / ``"L.H"`` / a :class:`Circuit`, or a dict ``label -> heads`` for several
    marker sets (the legend names them; a bare set is called ``mark_label``, default "reference
    heads", a Circuit "<Task> circuit"). ``panel_marks`` gives
    each panel its own marks (e.g. the *other* task's heads), merged with ``marks``.
    ``mark_styles``: label -> index into :data:`MARK_STYLES` (marker, colour), so that one head set
    keeps its marker in every figure whatever else is marked (the report gives each task its own);
    labels not in it take the styles it does not use, in alphabetical order of the labels.
    ``annotate`` writes the score in each cell (default: only for small grids, <= 64 heads).
    Heads without a computed score (:func:`computed_mask`: NaN, or not among a path-patching run's
    senders) are drawn hatched and unlabelled, with a "not computed" legend entry, never as 0.00.
    """
    panels = [scores] if isinstance(scores, HeadScores) else list(scores)
    if not panels:
        raise ValueError("head_heatmaps needs at least one HeadScores")
    if panel_marks is not None and len(panel_marks) != len(panels):
        raise ValueError(f"panel_marks has {len(panel_marks)} entries for {len(panels)} panels: give one per panel")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"titles has {len(titles)} entries for {len(panels)} panels: give one per panel")
    n_layers, n_heads = panels[0].n_layers, panels[0].n_heads
    if annotate is None:
        annotate = n_layers * n_heads <= 64

    cell = 0.32 if n_layers * n_heads > 64 else 0.5
    panel_w = max(3.2, n_layers * cell + 1.6)
    panel_h = max(3.0, n_heads * cell + 1.2)
    if axes is None:
        fig, axes = _new_figure(len(panels), panel_w, panel_h, extra_h=0.5)
    else:
        axes = list(axes)
        if len(axes) != len(panels):
            raise ValueError(f"got {len(axes)} axes for {len(panels)} panels")
        fig = axes[0].figure

    shared = _mark_sets(marks, mark_label)
    legend: dict[str, Any] = {}
    # one marker style per label: explicit ones from ``mark_styles``, the others in alphabetical order of
    # the labels after them (the same labels get the same markers whichever panel they appear in first)
    labels = set(shared)
    for pm in panel_marks or []:
        labels |= set(_mark_sets(pm, mark_label))
    styles: dict[str, int] = {label: int(i) for label, i in (mark_styles or {}).items() if label in labels}
    taken = {int(i) for i in (mark_styles or {}).values()}  # reserved even when its label is not in this figure
    free = (i for i in range(len(labels) + len(taken) + 1) if i not in taken)
    styles.update({label: next(free) for label in sorted(labels - set(styles))})
    for i, (hs, ax) in enumerate(zip(panels, axes)):
        if (hs.n_layers, hs.n_heads) != (n_layers, n_heads):
            raise ValueError("all HeadScores in one figure must have the same [n_layers, n_heads] shape")
        sets = dict(shared)
        if panel_marks is not None:
            for label, heads in _mark_sets(panel_marks[i], mark_label).items():
                sets[label] = sets.get(label, []) + heads
        values = hs.scores.detach().float().cpu().numpy().T  # [head, layer]: layer on x
        computed = computed_mask(hs)
        shown = values if computed is None else np.ma.masked_where(~computed.T, values)
        mesh = ax.pcolormesh(
            np.arange(n_layers + 1), np.arange(n_heads + 1), shown, cmap=cmap, vmin=vmin, vmax=vmax,
            edgecolors="white", linewidth=0.4,
        )
        if computed is not None:
            for l, h in zip(*np.nonzero(~computed)):
                ax.add_patch(Rectangle((l, h), 1, 1, **_not_computed_style(), zorder=1.5))
            legend[NOT_COMPUTED] = Patch(**_not_computed_style(), label=NOT_COMPUTED)
        ax.set_xlim(0, n_layers)
        ax.set_ylim(n_heads, 0)  # head 0 at the top
        ax.set_aspect("equal")
        _cell_ticks(ax, n_layers, n_heads)
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_title(titles[i] if titles is not None else pretty_name(hs.target), fontsize=12)
        for side in ax.spines.values():
            side.set_visible(False)
        cbar = fig.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02, aspect=25)
        cbar.set_label(cbar_label or METHOD_NAMES.get(hs.method, hs.method.replace("_", " ")), fontsize=10)
        cbar.outline.set_visible(False)
        if annotate:
            _annotate_cells(ax, values, vmin, vmax, cmap, None if computed is None else computed.T)
        for label, heads in sets.items():
            style = styles.setdefault(label, len(styles))
            legend[label] = _draw_marks(ax, heads, style, n_layers, n_heads, corner=annotate)

    if mark_styles:  # marker sets in style order: the same legend order in every figure sharing ``mark_styles``
        legend = dict(sorted(legend.items(), key=lambda kv: styles.get(kv[0], len(styles))))
    if NOT_COMPUTED in legend:  # last in the legend, after the marker sets
        legend[NOT_COMPUTED] = legend.pop(NOT_COMPUTED)
    if legend:
        fig.legend(
            # at most one column per panel: a legend wider than the panels would be cut off
            legend.values(), legend.keys(), loc="outside lower center", ncols=min(4, len(legend), len(panels)),
            frameon=False, fontsize=10,
        )
    if suptitle is None:
        models = {hs.model for hs in panels}
        methods = {hs.method for hs in panels}
        if len(models) == 1 and len(methods) == 1:
            ks = [str(hs.k) for hs in panels if hs.k is not None]
            suptitle = f"{next(iter(models))}: {METHOD_NAMES.get(panels[0].method, panels[0].method.replace('_', ' '))}"
            if ks:
                suptitle += " · k = " + ", ".join(dict.fromkeys(ks))
    if suptitle:
        fig.suptitle(suptitle, fontsize=11, color="0.3")
    return fig


def _cell_ticks(ax, n_x: int, n_y: int) -> None:
    sx, sy = _tick_step(n_x), _tick_step(n_y)
    ax.set_xticks(np.arange(0, n_x, sx) + 0.5, [str(i) for i in range(0, n_x, sx)])
    ax.set_yticks(np.arange(0, n_y, sy) + 0.5, [str(i) for i in range(0, n_y, sy)])
    size = 8 if max(n_x, n_y) > 12 else 10
    ax.tick_params(length=0, labelsize=size)


def _annotate_cells(ax, values: np.ndarray, vmin: float, vmax: float, cmap: str,
                    computed: np.ndarray | None = None) -> None:
    colormap = plt.get_cmap(cmap)
    for y in range(values.shape[0]):
        for x in range(values.shape[1]):
            if computed is not None and not computed[y, x]:
                continue
            v = values[y, x]
            rgb = colormap((v - vmin) / (vmax - vmin + 1e-12))[:3]
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
            text = f"{v:.2f}"
            ax.text(x + 0.5, y + 0.5, "0.00" if text == "-0.00" else text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "0.15")


def _draw_marks(ax, heads: list[Head], style: int, n_layers: int, n_heads: int, *, corner: bool):
    """Markers on ``heads``: centred on the cell, or in its top-right corner (``corner``) when the
    cell shows its value. Style ``i`` = ``MARK_STYLES[i]``; several sets on one cell stay visible."""
    marker, colour, filled = MARK_STYLES[style % len(MARK_STYLES)]
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ValueError(
                f"marked head {head_name((l, h))} is outside the {n_layers}x{n_heads} grid: "
                "were the marks made for another model?"
            )
    # one corner per style (top right, top left, bottom right, bottom left), so up to four sets on one cell stay apart
    dx, dy = [(0.8, 0.22), (0.2, 0.22), (0.8, 0.8), (0.2, 0.8)][style % 4] if corner else (0.5, 0.5)
    xs = [l + dx for l, _ in heads]
    ys = [h + dy for _, h in heads]
    size = 70 if corner else 130
    kwargs = dict(marker=marker, s=size, linewidths=0.9 if filled else 2.2, zorder=3)
    if filled:
        kwargs.update(c=colour, edgecolors="white")
    else:
        kwargs.update(facecolors="none", edgecolors=colour)
    art = ax.scatter(xs, ys, **kwargs)
    # a dark rim outside the white one: the mark stands out on light, dark and same-coloured cells alike
    # (a red X on a red patching cell would otherwise be only its white edge)
    if filled:
        art.set_path_effects([pe.withStroke(linewidth=2.4, foreground="0.1"), pe.Normal()])
    else:
        art.set_path_effects([pe.withStroke(linewidth=4.6, foreground="0.1"),
                              pe.withStroke(linewidth=3.5, foreground="white")])
    return art


def patching_heatmap(
    values: Real[Tensor, "rows cols"] | Real[np.ndarray, "rows cols"],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    center: float = 0.0,
    cmap: str = DIVERGING_CMAP,
    colorbar_label: str = "normalised metric",
    xlabel: str = "",
    ylabel: str = "",
    vmax: float | None = None,
    annotate: bool | None = None,
    ax=None,
) -> Figure:
    """A diverging heatmap centred at ``center`` (layer x position or layer x head patching grids).

    Rows run down the y axis (row 0 at the top), columns along x; the colour scale is symmetric
    about ``center`` (``vmax`` = largest distance from it unless given).
    """
    arr = torch.as_tensor(values).detach().float().cpu().numpy()
    if arr.ndim != 2:
        raise ValueError(f"patching_heatmap needs a 2-D [rows, cols] grid; got shape {arr.shape}")
    n_rows, n_cols = arr.shape
    for labels, n, what in ((row_labels, n_rows, "row_labels"), (col_labels, n_cols, "col_labels")):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{what} has {len(labels)} labels for {n} {what.split('_')[0]}s")
    span = vmax if vmax is not None else float(np.nanmax(np.abs(arr - center))) or 1.0
    if ax is None:
        longest = max((len(str(c)) for c in col_labels), default=2) if col_labels is not None else 2
        fig, (ax,) = _new_figure(
            1, max(4.0, n_cols * 0.38 + 2.0), max(3.0, n_rows * 0.32 + 1.2 + 0.06 * longest)
        )
    fig = ax.figure
    mesh = ax.pcolormesh(
        np.arange(n_cols + 1), np.arange(n_rows + 1), arr, cmap=cmap, vmin=center - span,
        vmax=center + span, edgecolors="white", linewidth=0.4,
    )
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    _cell_ticks(ax, n_cols, n_rows)
    if col_labels is not None:
        step = _tick_step(n_cols)
        slanted = max(len(str(c)) for c in col_labels) > 3
        ax.set_xticks(np.arange(0, n_cols, step) + 0.5, [str(c) for c in col_labels][::step],
                      rotation=60 if slanted else 0, ha="right" if slanted else "center", rotation_mode="anchor")
    if row_labels is not None:
        step = _tick_step(n_rows)
        ax.set_yticks(np.arange(0, n_rows, step) + 0.5, [str(r) for r in row_labels][::step])
    if annotate is None:
        annotate = arr.size <= 64
    if annotate:
        for y in range(n_rows):
            for x in range(n_cols):
                strong = abs(arr[y, x] - center) > 0.6 * span
                ax.text(x + 0.5, y + 0.5, f"{arr[y, x]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if strong else "0.15")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    cbar = fig.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02, aspect=25)
    cbar.set_label(colorbar_label)
    cbar.outline.set_visible(False)
    return fig


def _label(hs: HeadScores) -> str:
    text = f"{METHOD_NAMES.get(hs.method, hs.method.replace('_', ' '))} · {pretty_name(hs.target)}"
    return text + (f" (k={hs.k})" if hs.k is not None else "")


LAYER_LEGEND_MAX = 12  # scatter plots name each layer in a legend up to this many layers


class PointLabels(matplotlib.artist.Artist):
    """Places point labels (annotations) at draw time so that no two labels overlap.

    Deterministic and greedy: labels are placed in the order given (most important first); each tries
    positions around its point on rings of growing radius (8 directions, then 16), and takes the first
    that lies inside the axes, overlaps no placed label, covers no point of ``points`` and crosses no
    line of the axes (the diagonal); when no position meets the last two, the first that meets the
    first two. A label away from its point gets a thin leader line. Runs at every draw, in display
    coordinates, after the layout engine has sized the axes, so saving at another size or dpi keeps
    labels apart. Placed label boxes (display pixels) are in :attr:`boxes` after a draw.
    """

    PAD_PT = 1.5     # clearance between two labels and between a label and a point, points
    STEP_PT = 5.0    # ring spacing, points
    RINGS = 24       # up to ~120 points away
    LEADER_FROM_RING = 1  # rings >= this get a leader line

    def __init__(self, ax, annotations, points_xy, point_radius_pt: float):
        super().__init__()
        self.ax, self.annotations = ax, list(annotations)
        self.points_xy = np.asarray(points_xy, dtype=float).reshape(-1, 2)
        self.point_radius_pt = point_radius_pt
        self.boxes: list = []
        self.set_zorder(-10)  # drawn before the texts it moves and before the legend ("best" avoids texts)
        self.set_clip_on(False)

    def get_window_extent(self, renderer=None):
        return matplotlib.transforms.Bbox.null()

    def get_tightbbox(self, renderer=None):
        return None

    @staticmethod
    def _overlaps(a, b, pad: float) -> bool:
        return bool(a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad)

    def _directions(self, ring: int) -> list[tuple[float, float]]:
        first = [45, 135, -45, -135, 0, 180, 90, -90]  # NE, NW, SE, SW, E, W, N, S
        angles = first if ring < 2 else first + [22.5, 157.5, -22.5, -157.5, 67.5, 112.5, -67.5, -112.5]
        return [(np.cos(np.radians(a)), np.sin(np.radians(a))) for a in angles]

    def draw(self, renderer):
        if not self.get_visible() or not self.annotations:
            return
        px = renderer.points_to_pixels(1.0)
        pad, r_pt = self.PAD_PT * px, self.point_radius_pt * px
        frame = self.ax.bbox
        pts = self.ax.transData.transform(self.points_xy) if len(self.points_xy) else np.zeros((0, 2))
        line_pts = []
        for line in self.ax.get_lines():
            path = line.get_transform().transform_path(line.get_path()).interpolated(200)
            line_pts.append(path.vertices)
        line_pts = np.concatenate(line_pts) if line_pts else np.zeros((0, 2))
        self.boxes = []
        for ann in self.annotations:
            anchor = self.ax.transData.transform(ann.xy)
            ann.set_horizontalalignment("center")
            ann.set_verticalalignment("center")
            ann.xyann = (0.0, 0.0)
            ann.update_positions(renderer)
            ext = matplotlib.text.Text.get_window_extent(ann, renderer)
            w, h = ext.width, ext.height
            fallback = best = None
            for ring in range(self.RINGS):
                radius = r_pt + pad + ring * self.STEP_PT * px
                for cx, cy in self._directions(ring):
                    # centre so that the box's nearest edge is `radius` from the point along (cx, cy)
                    dx = cx * (radius + w / 2) if abs(cx) > 1e-9 else 0.0
                    dy = cy * (radius + h / 2) if abs(cy) > 1e-9 else 0.0
                    x0, y0 = anchor[0] + dx - w / 2, anchor[1] + dy - h / 2
                    box = (x0, y0, x0 + w, y0 + h)
                    if box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1:
                        continue
                    if any(self._overlaps(box, b, pad) for b in self.boxes):
                        continue
                    if fallback is None:
                        fallback = (box, dx, dy, ring)
                    grown = (box[0] - r_pt, box[1] - r_pt, box[2] + r_pt, box[3] + r_pt)
                    covers = len(pts) and np.any((pts[:, 0] > grown[0]) & (pts[:, 0] < grown[2])
                                                 & (pts[:, 1] > grown[1]) & (pts[:, 1] < grown[3]))
                    crosses = len(line_pts) and np.any((line_pts[:, 0] > box[0]) & (line_pts[:, 0] < box[2])
                                                       & (line_pts[:, 1] > box[1]) & (line_pts[:, 1] < box[3]))
                    if not covers and not crosses:
                        best = (box, dx, dy, ring)
                        break
                if best is not None:
                    break
            choice = best or fallback
            if choice is None:  # no free place inside the axes at all: leave the label hidden, never overlapping
                ann.set_visible(False)
                continue
            box, dx, dy, ring = choice
            ann.set_visible(True)
            ann.xyann = (dx / px, dy / px)
            if ann.arrow_patch is not None:
                ann.arrow_patch.set_visible(ring >= self.LEADER_FROM_RING)
            self.boxes.append(box)


def scatter_scores(
    x: HeadScores,
    y: HeadScores,
    *,
    annotate_top: int = 5,
    annotate: Iterable[Head | str] | None = None,
    r: float | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    diagonal: bool = False,
    ax=None,
) -> Figure:
    """One point per head: ``x`` score against ``y`` score, head names on the top points, coloured by
    layer (a legend names each layer; above :data:`LAYER_LEGEND_MAX` layers, a colour bar with one
    band per layer).

    The ``annotate_top`` best heads by ``x`` and by ``y`` are labelled ``"L.H"``, plus the heads in
    ``annotate``. Labels never overlap one another (:class:`PointLabels` places them at draw time,
    with a leader line when a label sits away from its point). ``r`` (e.g. a precomputed
    correlation) is shown where it covers no point; ``None`` shows Pearson's r of the two matrices.
    ``diagonal`` draws y = x.
    """
    if x.scores.shape != y.scores.shape:
        raise ValueError(f"x and y must score the same heads; shapes {tuple(x.scores.shape)} vs {tuple(y.scores.shape)}")
    xs, ys = x.scores.flatten().numpy(), y.scores.flatten().numpy()
    if r is None:
        r = float(np.corrcoef(xs, ys)[0, 1]) if xs.std() > 0 and ys.std() > 0 else float("nan")
    if ax is None:
        fig, (ax,) = _new_figure(1, 5.2, 4.6)
    fig = ax.figure
    n_layers = x.n_layers
    layers = np.repeat(np.arange(n_layers), x.n_heads)
    # layers are categories: one colour per layer, a legend entry per layer (a colour bar with one
    # band per layer and integer ticks when there are too many layers for a legend)
    colours = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 0.9, n_layers)) if n_layers > 1
                             else ["#2a6f97"])
    norm = BoundaryNorm(np.arange(n_layers + 1) - 0.5, colours.N)
    size = 28
    points = ax.scatter(xs, ys, c=layers, cmap=colours, norm=norm, s=size, alpha=0.85, edgecolors="white",
                        linewidths=0.4)
    if 1 < n_layers <= LAYER_LEGEND_MAX:
        handles = [plt.Line2D([], [], ls="none", marker="o", ms=6, mfc=colours(i), mec="white", label=str(i))
                   for i in range(n_layers)]
        layer_legend = ax.legend(handles=handles, title="layer", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                                 frameon=False, fontsize=8, title_fontsize=9, handletextpad=0.2, borderaxespad=0)
        ax.add_artist(layer_legend)  # kept when the r box below becomes the axes' legend
        layer_legend.set_clip_on(False)  # add_artist clips to the axes (and layouts skip clipped artists)
    elif n_layers > LAYER_LEGEND_MAX:
        cbar = fig.colorbar(points, ax=ax, pad=0.02, aspect=30)
        cbar.set_ticks(range(0, n_layers, _tick_step(n_layers, 12)))
        cbar.set_label("layer")
        cbar.outline.set_visible(False)
    if diagonal:
        lo, hi = min(xs.min(), ys.min()), max(xs.max(), ys.max())
        ax.plot([lo, hi], [lo, hi], ls="--", color="0.6", lw=1, zorder=0)
    top = list(dict.fromkeys(x.top(annotate_top) + y.top(annotate_top) + _heads(annotate or [])))
    radius_pt = np.sqrt(size) / 2
    labels = [ax.annotate(head_name((l, h)), (x[(l, h)], y[(l, h)]), xytext=(0, 0), textcoords="offset points",
                          ha="center", va="center", fontsize=8, color="0.15", annotation_clip=False,
                          path_effects=[pe.withStroke(linewidth=2.5, foreground="white")],
                          arrowprops=dict(arrowstyle="-", color="0.45", lw=0.6, shrinkA=1, shrinkB=radius_pt + 1))
              for l, h in top]
    ax.add_artist(PointLabels(ax, labels, np.column_stack([xs, ys]), radius_pt))
    # r as a one-line legend: matplotlib's loc="best" keeps it off the points (and the labels)
    r_box = [plt.Line2D([], [], ls="none", label=f"r = {r:.2f}")]
    ax.legend(handles=r_box, loc="best", handlelength=0, handletextpad=0, fontsize=11, edgecolor="0.8")
    ax.set_xlabel(xlabel or _label(x))
    ax.set_ylabel(ylabel or _label(y))
    ax.set_title(title if title is not None else f"{x.model}: {x.n_layers * x.n_heads} heads")
    ax.grid(alpha=0.3)
    return fig


def _mean_spread(values) -> tuple[np.ndarray, np.ndarray | None]:
    """A curve as (mean, std or None) from a 1-D array, a [draws, x] array, or {"mean", "std"}."""
    if isinstance(values, Mapping):
        mean = np.asarray(values["mean"], dtype=float)
        std = values.get("std")
        return mean, None if std is None else np.asarray(std, dtype=float)
    arr = np.asarray(torch.as_tensor(values).float()) if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if arr.ndim == 2:
        return arr.mean(0), arr.std(0)
    return arr, None


def curve_plot(
    x: Sequence[float] | Real[np.ndarray, " n"] | Real[Tensor, " n"],
    curves: Mapping[str, Any],
    *,
    xlabel: str = "number of heads ablated",
    ylabel: str = "accuracy",
    title: str = "",
    baseline: Mapping[str, float] | float | None = None,
    ax=None,
) -> Figure:
    """Lines over ``x`` (e.g. ablation curves: relation heads vs random heads vs a control relation).

    Each entry of ``curves`` is a 1-D sequence, a ``[draws, len(x)]`` array (drawn as mean with a
    +-1 std band) or a dict ``{"mean": ..., "std": ...}``. ``baseline``: horizontal reference lines
    (a value, or ``label -> value``, e.g. clean accuracy and chance).
    """
    xs = np.asarray(x, dtype=float)
    if ax is None:
        fig, (ax,) = _new_figure(1, 5.6, 3.8)
    fig = ax.figure
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, values) in enumerate(curves.items()):
        mean, std = _mean_spread(values)
        if mean.shape != xs.shape:
            raise ValueError(f"curve {label!r} has {mean.shape[0] if mean.ndim else 0} points for {len(xs)} x values")
        colour = palette[i % len(palette)]
        band = " (mean ± std)" if std is not None else ""
        if band and label.endswith(")"):
            band = "; mean ± std"
            label = label[:-1]
            band += ")"
        ax.plot(xs, mean, marker="o", ms=4, color=colour, label=label + band)
        if std is not None:
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
    if baseline is not None:
        lines = baseline if isinstance(baseline, Mapping) else {"baseline": baseline}
        for j, (label, value) in enumerate(lines.items()):
            ax.axhline(value, ls=(0, (4, 3)) if j == 0 else ":", color="0.45", lw=1)
            ax.annotate(label, (0.0, value), xycoords=("axes fraction", "data"), xytext=(3, 3),
                        textcoords="offset points", ha="left", fontsize=8, color="0.35")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if np.allclose(xs, np.round(xs)) and len(xs) <= 30:  # counts (heads ablated, k): integer ticks
        ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=9)
    return fig


def topk_overlap_plot(curve: Mapping[str, Any], *, title: str | None = None, alpha: float = 0.05,
                      informative_up_to: int | None = None, ax=None) -> Figure:
    """Observed top-k overlap against k, with the chance line (k^2 / N) and the ceiling (k).

    ``curve`` is :func:`circuitlib.overlap.topk_overlap_curve`'s result. Filled markers: k where
    the hypergeometric p-value of that k alone is below ``alpha`` (one test per k, not corrected for
    the number of k shown; the legend says so). ``informative_up_to``: the largest k whose top-k sets
    hold only heads with meaningful scores (e.g. live heads above every switched-off head's score);
    larger k are shaded grey and labelled "order carries no information".
    """
    ks = np.asarray(curve["k"], dtype=float)
    observed = np.asarray(curve["observed"], dtype=float)
    expected = np.asarray(curve["expected"], dtype=float)
    p = np.asarray(curve["p_value"], dtype=float)
    if ax is None:
        fig, (ax,) = _new_figure(1, 5.4, 3.8)
    fig = ax.figure
    ax.plot(ks, ks, color="0.75", lw=1, ls=":", label="identical rankings (k)")
    ax.plot(ks, expected, color="0.4", lw=1.2, ls="--", label="chance (k² / N)")
    ax.plot(ks, observed, color="#2a6f97", lw=1.8, label="observed |top-k ∩ top-k|")
    sig = p < alpha
    ax.scatter(ks[sig], observed[sig], color="#2a6f97", s=28, zorder=3, label=f"p < {alpha:g} (each k alone, uncorrected)")
    ax.scatter(ks[~sig], observed[~sig], facecolors="white", edgecolors="#2a6f97", s=28, zorder=3,
               label=f"p ≥ {alpha:g}")
    if informative_up_to is not None and informative_up_to < ks.max():
        ax.axvspan(informative_up_to + 0.5, ks.max() + 0.5, color="0.9", zorder=0, lw=0,
                   label=f"k > {informative_up_to}: order carries no information")
    ax.set_xlabel("k (top heads taken from each scoring)")
    ax.set_ylabel("heads in both top-k sets")
    names = curve.get("names")
    ax.set_title(title if title is not None else (f"{names[0]} vs {names[1]}" if names else "top-k overlap"))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return fig


@torch.no_grad()
def attention_pattern(
    model: HookedTransformer,
    tokens: str | Int[Tensor, " seq"] | Sequence[int],
    layer: int,
    head: int,
    *,
    title: str | None = None,
    ax=None,
) -> Figure:
    """One head's attention on one prompt: query position (y) x key position (x), token labels.

    ``tokens``: a string (BOS is prepended, as everywhere in circuitlib) or the ids of one prompt
    (pass a :class:`TaskBatch` row trimmed to its END, e.g. ``batch.clean[i, : batch.end[i] + 1]``).
    """
    if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
        raise ValueError(f"head {layer}.{head} does not exist in a {model.cfg.n_layers}x{model.cfg.n_heads} model")
    if isinstance(tokens, str):
        ids = model.to_tokens(tokens, prepend_bos=True)[0]
    else:
        ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    _, cache = model.run_with_cache(ids[None].to(model.cfg.device),
                                    names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache["pattern", layer][0, head].cpu().numpy()  # [query, key]
    bos = model.tokenizer.bos_token_id
    labels = ["BOS" if int(t) == bos else model.tokenizer.decode([int(t)]) for t in ids]
    labels = [lab.replace("\n", "\\n") if lab.strip() else repr(lab) for lab in labels]
    n = len(labels)
    if ax is None:
        side = max(3.5, 0.32 * n + 1.8)
        fig, (ax,) = _new_figure(1, side + 0.8, side)
    fig = ax.figure
    masked = np.ma.masked_where(np.triu(np.ones((n, n), dtype=bool), k=1), pattern)
    mesh = ax.pcolormesh(np.arange(n + 1), np.arange(n + 1), masked, cmap="Blues", vmin=0, vmax=1,
                         edgecolors="white", linewidth=0.3)
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(n) + 0.5, labels, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(n) + 0.5, labels)
    ax.tick_params(length=0, labelsize=8 if n > 12 else 9)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title if title is not None else f"attention of head {head_name((layer, head))}")
    cbar = fig.colorbar(mesh, ax=ax, shrink=0.8, pad=0.02, aspect=25)
    cbar.set_label("attention weight")
    cbar.outline.set_visible(False)
    return fig
