"""An ipywidgets explorer over head scores: pick a relation and a head, see what the head does.

``Explorer(model, scores, batches).widget`` (or just ``explorer`` as the last line of a cell) shows

- the head's place on the relation's layer x head heatmap (marked);
- its OV view: for a few sample sources of the relation, the top tokens of
  ``m_s = x_s W_V W_O W_U`` (MAPS, :func:`circuitlib.scoring.top_mapped_tokens`), target highlighted;
- its suppression view (the same on ``-m_s``);
- its attention pattern on a chosen task prompt (clean prompt, BOS first, up to END);
- its patching scores on the chosen task, one row per head-scoring method registered in
  :data:`circuitlib.circuits.HEAD_SCORERS` (read when shown, so a method added with
  :func:`circuitlib.circuits.register_scorer` appears without changes here), with the head's rank by
  ``|score|`` and the direction (noising / denoising) each method reports.

Every view is a plain method returning its data as a frozen result (:meth:`Explorer.select` a
:class:`HeadView`, :meth:`Explorer.attention` an :class:`AttentionView`, :meth:`Explorer.patching` a
:class:`PatchingView`; each also reads as the mapping of its ``to_dict()``, ``view["score"]``, as the
dicts they replaced) or a Figure (:meth:`Explorer.heatmap`, :meth:`Explorer.attention_figure`), so they can be called and
tested without a browser; the widgets only wire them together.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import ClassVar, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from transformer_lens import HookedTransformer

from . import plots
from .results import MappingResult
from .types import Head, HeadScores, RelationPairs, TaskBatch, head_name, parse_head


@dataclass(frozen=True)
class MappedSource(MappingResult):
    """One source word's row of the OV (or suppression) view.

    ``source`` / ``target``: the word pair (``target`` None when the source is not in the relation);
    ``top``: the ``n_tokens`` tokens with the largest (suppression: smallest) logits of
    ``m_s = x_s W_V W_O W_U`` as ``(token, logit)``, best first
    (:func:`circuitlib.scoring.top_mapped_tokens`); ``target_rank``: 1-based rank of the target among
    them, compared after stripping whitespace (None when not among them).
    """

    source: str
    target: str | None
    top: tuple[tuple[str, float], ...]
    target_rank: int | None


@dataclass(frozen=True)
class HeadView(MappingResult):
    """What the explorer shows for one head under one scoring (:meth:`Explorer.select`).

    ``relation`` (the explorer's entry), ``target`` / ``method`` / ``k`` (the scoring's); ``head``
    ``"L.H"``; ``score`` rounded to 4 decimals; ``rank``: 1-based among ``n_heads`` heads, highest score
    first (ties in :meth:`HeadScores.top`'s order); ``ov`` / ``suppression``: one :class:`MappedSource`
    per sample source (empty for a scoring that is not a relation). Reads as the mapping of its
    ``to_dict()`` (``view["ov"][0]["top"]``), as the dict it once was.
    """

    relation: str
    target: str
    method: str
    k: int | None
    head: str
    score: float
    rank: int
    n_heads: int
    ov: tuple[MappedSource, ...]
    suppression: tuple[MappedSource, ...]


@dataclass(frozen=True)
class AttentionView(MappingResult):
    """One head's attention from END on one clean prompt (:meth:`Explorer.attention`).

    ``tokens``: the prompt's tokens up to END (BOS first); ``end_attention``: the attention weight from
    END to each of them (sums to 1, rounded to 4 decimals); ``top_keys``: the three most attended
    ``(position, token, weight)``; ``positions``: the prompt's named positions (``END``, ``IO``, ...).
    """

    task: str
    index: int
    head: str
    prompt: str
    tokens: tuple[str, ...]
    end_attention: tuple[float, ...]
    top_keys: tuple[tuple[int, str, float], ...]
    positions: dict[str, int]


@dataclass(frozen=True, kw_only=True)
class MethodScore(MappingResult):
    """One head under one registered head-scoring method (a row of :class:`PatchingView`).

    ``score`` (rounded to 4 decimals), ``rank`` (1 = the largest ``|score|`` of all heads),
    ``direction`` and ``metric`` as the scorer recorded them; or only ``error`` when the method failed on
    the task. Fields that do not apply are left out of ``to_dict()``.
    """

    _optional: ClassVar[tuple[str, ...]] = ("score", "rank", "direction", "metric", "error")

    score: float | None = None
    rank: int | None = None
    direction: str | None = None
    metric: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class PatchingView(MappingResult):
    """One head's scores under every registered head-scoring method on one task (:meth:`Explorer.patching`).

    ``methods``: method name -> :class:`MethodScore`, in registry order; ``direction``: the direction
    asked for (each row says the one its scorer used); ``n_prompts`` / ``n_heads``: the task's prompts
    and the model's heads.
    """

    task: str
    head: str
    direction: str
    n_prompts: int
    n_heads: int
    methods: dict[str, MethodScore]


class Explorer:
    """Browse heads of ``model`` by their ``scores`` (name -> HeadScores, e.g. MAPS static per relation).

    ``batches``: task name -> TaskBatch for the attention view (optional). ``n_sources`` sample
    sources (spread evenly over the relation's pairs) and ``n_tokens`` top tokens per source in the
    OV / suppression views. A scoring whose ``target`` is not a relation name has no OV samples.
    """

    def __init__(
        self,
        model: HookedTransformer,
        scores: dict[str, HeadScores],
        batches: dict[str, TaskBatch] | None = None,
        *,
        n_sources: int = 5,
        n_tokens: int = 10,
    ) -> None:
        if not scores:
            raise ValueError("Explorer needs at least one HeadScores (e.g. {'name_copying': static_scores(...)})")
        grid = (model.cfg.n_layers, model.cfg.n_heads)
        for name, hs in scores.items():
            if tuple(hs.scores.shape) != grid:
                raise ValueError(
                    f"scores[{name!r}] has shape {tuple(hs.scores.shape)} but the model has {grid[0]}x{grid[1]} "
                    "heads: pass scores computed on this model"
                )
        self.model = model
        self.scores = dict(scores)
        self.batches = dict(batches or {})
        self.n_sources = n_sources
        self.n_tokens = n_tokens
        self._pairs: dict[str, RelationPairs | None] = {}
        self._patching: dict[tuple[str, str, str], HeadScores] = {}
        self._widget = None
        self._hold = False  # True while one change updates several widgets: redraw once at the end

    # -- data -------------------------------------------------------------------------------

    def heads(self, relation: str) -> list[str]:
        """All heads as ``"L.H"``, best score first for ``relation``."""
        hs = self._scores(relation)
        return [head_name(h) for h in hs.top(hs.scores.numel())]

    def pairs(self, relation: str) -> RelationPairs | None:
        """The relation's single-token pairs for this model's tokenizer (``None``: not a relation)."""
        target = self._scores(relation).target
        if target not in self._pairs:
            from .tasks import relation_names
            from .tasks.relations import load_relation

            self._pairs[target] = (
                load_relation(target, self.model.tokenizer, check=False) if target in relation_names() else None
            )
        return self._pairs[target]

    def sample_sources(self, relation: str) -> list[tuple[str, str]]:
        """``n_sources`` (source, target) word pairs spread evenly over the relation's pairs."""
        pairs = self.pairs(relation)
        if pairs is None or len(pairs) == 0:
            return []
        idx = np.unique(np.linspace(0, len(pairs) - 1, min(self.n_sources, len(pairs))).round().astype(int))
        return [(pairs.src_words[i], pairs.tgt_words[i]) for i in idx]

    def select(self, relation: str, head: Head | str, sources: Sequence[str] | None = None) -> HeadView:
        """Everything the explorer shows for ``head`` under ``relation`` (:class:`HeadView`, JSON-able).

        ``ov`` / ``suppression``: per source, the top ``n_tokens`` mapped tokens with logits and the
        1-based rank of the target among them (``None`` if not shown). ``sources`` (words) replace
        the sample sources; their targets are looked up in the relation when present.
        """
        from .scoring import top_mapped_tokens

        hs = self._scores(relation)
        head = self._head(head)
        samples = self.sample_sources(relation)
        if sources is not None:
            lookup = dict(zip(self.pairs(relation).src_words, self.pairs(relation).tgt_words)) if self.pairs(relation) else {}
            samples = [(s, lookup.get(s)) for s in sources]

        def view(suppression: bool) -> tuple[MappedSource, ...]:
            rows = []
            for src, tgt in samples:
                top = top_mapped_tokens(self.model, head, src, n=self.n_tokens, suppression=suppression)
                shown = [t.strip() for t, _ in top]
                rank = shown.index(tgt) + 1 if tgt is not None and tgt in shown else None
                rows.append(MappedSource(source=src, target=tgt, top=tuple((t, float(v)) for t, v in top),
                                         target_rank=rank))
            return tuple(rows)

        order = hs.top(hs.scores.numel())
        return HeadView(relation=relation, target=hs.target, method=hs.method, k=hs.k, head=head_name(head),
                        score=round(hs[head], 4), rank=order.index(head) + 1, n_heads=len(order),
                        ov=view(False), suppression=view(True))

    @torch.no_grad()
    def attention(self, task: str, index: int, head: Head | str) -> AttentionView:
        """The head's attention from the END position of prompt ``index`` of ``task`` to every token
        (clean prompt, run alone up to END: the same pattern as in the padded batch, attention being causal)."""
        batch = self._batch(task)
        layer, h = self._head(head)
        if not 0 <= index < len(batch):
            raise ValueError(f"prompt index {index} out of range: the {task!r} batch has {len(batch)} prompts")
        end = int(batch.end[index])
        tokens = batch.clean[index, : end + 1]
        _, cache = self.model.run_with_cache(tokens[None].to(self.model.cfg.device),
                                             names_filter=f"blocks.{layer}.attn.hook_pattern")
        row = cache["pattern", layer][0, h, end].cpu()
        labels = [self.model.tokenizer.decode([int(t)]) for t in tokens]
        top = torch.argsort(row, descending=True, stable=True)[:3]
        return AttentionView(
            task=task, index=index, head=head_name((layer, h)), prompt=batch.prompts[index], tokens=tuple(labels),
            end_attention=tuple(round(float(v), 4) for v in row),
            top_keys=tuple((int(i), labels[int(i)], round(float(row[i]), 4)) for i in top),
            positions={k: int(v[index]) for k, v in batch.positions.items()})

    @torch.no_grad()
    def attention_to(self, task: str, key: str = "IO", query: str = "END") -> HeadScores:
        """Every head's mean attention from ``query`` to ``key`` over the task's clean prompts.

        E.g. ``attention_to("ioi", "IO")`` finds name-mover-like heads (END attends to the indirect
        object); positions are the batch's named positions. Add the result to ``scores`` to browse it.
        """
        batch = self._batch(task)
        for name in (key, query):
            if name not in batch.positions:
                raise ValueError(f"{task!r} prompts have no position {name!r}; they have {sorted(batch.positions)}")
        _, cache = self.model.run_with_cache(batch.clean.to(self.model.cfg.device),
                                             names_filter=lambda n: n.endswith("hook_pattern"))
        rows = torch.arange(len(batch))
        q, k = batch.positions[query], batch.positions[key]
        values = torch.stack([cache["pattern", l][rows, :, q, k].mean(0).cpu() for l in range(self.model.cfg.n_layers)])
        return HeadScores(values, method="attention", target=f"{task}: {query} -> {key}",
                          model=self.model.cfg.model_name, meta={"prompts": len(batch), "clean": True})

    # -- patching ---------------------------------------------------------------------------

    @staticmethod
    def patching_methods() -> list[str]:
        """The head-scoring methods registered in :data:`circuitlib.circuits.HEAD_SCORERS`, in
        registry order (read at every call: a newly registered method shows up at once)."""
        from .circuits import HEAD_SCORERS

        return list(HEAD_SCORERS)

    def patching_scores(self, task: str, method: str, *, direction: str = "noising") -> HeadScores:
        """Every head's score on the ``task`` batch by the registered ``method`` (computed once, cached).

        ``direction`` is passed to the scorer; a scorer that supports only one direction (path
        patching: noising) records the one it used in ``meta["direction"]``.
        """
        from .circuits import HEAD_SCORERS

        if method not in HEAD_SCORERS:
            raise ValueError(f"unknown head-scoring method {method!r}: registered are {tuple(HEAD_SCORERS)}")
        if direction not in ("noising", "denoising"):
            raise ValueError(f"unknown direction {direction!r}: use 'noising' or 'denoising'")
        key = (task, method, direction)
        if key not in self._patching:
            self._patching[key] = HEAD_SCORERS[method](self.model, self._batch(task), direction=direction)
        return self._patching[key]

    def patching(self, task: str, head: Head | str, *, direction: str = "noising") -> PatchingView:
        """The head's score under every registered head-scoring method on ``task`` (:class:`PatchingView`).

        Per method: ``score``, ``rank`` (1 = largest ``|score|`` of all heads, ties in
        :meth:`HeadScores.top`'s order), ``direction`` and ``metric`` as the scorer recorded them; a method
        that fails on this task (a ValueError, e.g. positions the task lacks) gets ``error``.
        """
        head = self._head(head)
        methods: dict[str, MethodScore] = {}
        for name in self.patching_methods():
            try:
                hs = self.patching_scores(task, name, direction=direction)
            except ValueError as exc:  # e.g. a scorer that needs positions this task lacks
                methods[name] = MethodScore(error=str(exc))
                continue
            order = hs.top(hs.scores.numel(), absolute=True)
            methods[name] = MethodScore(score=round(hs[head], 4), rank=order.index(head) + 1,
                                        direction=hs.meta.get("direction", direction),
                                        metric=hs.meta.get("metric", ""))
        return PatchingView(task=task, head=head_name(head), direction=direction, n_prompts=len(self._batch(task)),
                            n_heads=self.model.cfg.n_layers * self.model.cfg.n_heads, methods=methods)

    # -- figures ----------------------------------------------------------------------------

    def heatmap(self, relation: str, head: Head | str) -> Figure:
        """The relation's heatmap with ``head`` marked; the colour bar and the title name the quantity
        (:func:`quantity`), the colour scale covers [0, 1] and any score outside it."""
        hs = self._scores(relation)
        label = quantity(hs)
        suptitle = f"{hs.model} · {SHORT.get(hs.method, label)}" + (f" · k = {hs.k}" if hs.k is not None else "")
        return plots.head_heatmaps(hs, {f"head {head_name(self._head(head))}": [self._head(head)]},
                                   vmin=min(0.0, float(hs.scores.min())), vmax=max(1.0, float(hs.scores.max())),
                                   cbar_label=label, suptitle=suptitle, titles=[relation_title(relation, hs)])

    def attention_figure(self, task: str, index: int, head: Head | str) -> Figure:
        """:func:`circuitlib.plots.attention_pattern` of ``head`` on prompt ``index`` of ``task``."""
        batch = self._batch(task)
        layer, h = self._head(head)
        tokens = batch.clean[index, : int(batch.end[index]) + 1]
        return plots.attention_pattern(self.model, tokens, layer, h,
                                       title=f"head {layer}.{h} on {task} prompt {index}")

    # -- widget -----------------------------------------------------------------------------

    @property
    def widget(self):
        """The ipywidgets UI (built once)."""
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _build(self):
        import ipywidgets as w

        relations = list(self.scores)
        self.relation_w = w.Dropdown(options=relations, value=relations[0], description="relation")
        self.head_w = w.Dropdown(options=self._head_options(relations[0]), description="head")
        self.source_w = w.Text(value="", placeholder="source words, comma-separated (optional)",
                               description="sources")
        tasks = list(self.batches)
        self.task_w = w.Dropdown(options=tasks, value=tasks[0] if tasks else None, description="task",
                                 disabled=not tasks)
        n = len(self.batches[tasks[0]]) if tasks else 1
        self.prompt_w = w.IntSlider(value=0, min=0, max=max(0, n - 1), description="prompt", disabled=not tasks)
        self.direction_w = w.Dropdown(options=["noising", "denoising"], value="noising", description="patching",
                                      disabled=not tasks)
        self.heatmap_out, self.attention_out = w.Output(), w.Output()
        self.views_html, self.patching_html = w.HTML(), w.HTML()
        self.relation_w.observe(self._on_relation, names="value")
        for control in (self.head_w, self.source_w):
            control.observe(lambda _: None if self._hold else self.refresh(), names="value")
        self.task_w.observe(self._on_task, names="value")
        self.prompt_w.observe(lambda _: self._draw_attention(), names="value")
        self.direction_w.observe(lambda _: self._draw_patching(), names="value")
        ui = w.VBox([
            w.HBox([self.relation_w, self.head_w, self.source_w]),
            w.HBox([self.heatmap_out, self.views_html]),
            w.HBox([self.task_w, self.prompt_w, self.direction_w]),
            w.HBox([self.attention_out, self.patching_html]),
        ])
        self.refresh()
        return ui

    def _head_options(self, relation: str) -> list[tuple[str, str]]:
        hs = self._scores(relation)
        return [(f"{name}  ({_fmt(hs[parse_head(name)])})", name) for name in self.heads(relation)]

    def _on_relation(self, change) -> None:
        current = self.head_w.value
        self._hold = True
        try:
            # the new order and the kept head reach the browser in one message: the dropdown never shows
            # the new list with the old index (ipywidgets syncs the index, not the value)
            with self.head_w.hold_sync():
                self.head_w.options = self._head_options(change["new"])
                self.head_w.value = current  # keep the chosen head across relations
        finally:
            self._hold = False
        self.refresh()

    def _on_task(self, change) -> None:
        self.prompt_w.max = max(0, len(self.batches[change["new"]]) - 1)
        self._draw_attention()
        self._draw_patching()

    def refresh(self) -> HeadView | None:
        """Redraw every view for the widgets' current choice; returns :meth:`select`'s data (``None`` when
        the choice is an error, e.g. a typed source word that is not one token, which the views then show)."""
        relation, head = self.relation_w.value, self.head_w.value
        words = [s.strip() for s in self.source_w.value.split(",") if s.strip()] or None
        data: HeadView | None = None
        try:
            data = self.select(relation, head, words)
            self.views_html.value = _views_html(data)
        except ValueError as exc:  # e.g. a typed source word that is not one token
            self.views_html.value = f"<div style='{_BOX}'><p style='color:#b00'>{html.escape(str(exc))}</p></div>"
        _show(self.heatmap_out, self.heatmap(relation, head))
        self._draw_attention()
        self._draw_patching()
        return data

    def _draw_attention(self) -> None:
        if not self.batches:
            return
        _show(self.attention_out, self.attention_figure(self.task_w.value, self.prompt_w.value, self.head_w.value))

    def _draw_patching(self) -> None:
        if not self.batches:
            return
        self.patching_html.value = _patching_html(
            self.patching(self.task_w.value, self.head_w.value, direction=self.direction_w.value))

    # -- helpers ----------------------------------------------------------------------------

    def _scores(self, relation: str) -> HeadScores:
        if relation not in self.scores:
            raise ValueError(f"unknown relation {relation!r}: the explorer has scores for {sorted(self.scores)}")
        return self.scores[relation]

    def _batch(self, task: str) -> TaskBatch:
        if task not in self.batches:
            raise ValueError(f"no prompts for task {task!r}: the explorer has batches for {sorted(self.batches)}")
        return self.batches[task]

    def _head(self, head: Head | str) -> Head:
        l, h = parse_head(head) if isinstance(head, str) else (int(head[0]), int(head[1]))
        if not (0 <= l < self.model.cfg.n_layers and 0 <= h < self.model.cfg.n_heads):
            raise ValueError(f"head {l}.{h} does not exist in a {self.model.cfg.n_layers}x{self.model.cfg.n_heads} model")
        return l, h


def _show(out, fig: Figure) -> None:
    """Replace what the Output widget ``out`` shows by ``fig`` (closed afterwards).

    The figure goes in as the widget's ``outputs`` state, a PNG rendered as the inline backend renders
    it (``print_figure(fig, "png", bbox_inches="tight")``), not through ``with out: display(fig)``.
    That capture routes output messages to whichever Output widget the browser has registered for the
    message being handled, and the browser applies "out now captures message X" asynchronously
    relative to the outputs themselves; with two Output widgets redrawn in one callback, a figure could
    land in the wrong one or be dropped while the previous figure stayed. Widget state has no such race:
    the last state sent is what the browser shows.
    """
    from IPython.core.pylabtools import print_figure

    try:
        png = print_figure(fig, "png", bbox_inches="tight")
    finally:
        plt.close(fig)
    title = fig.axes[0].get_title() if fig.axes else ""
    out.outputs = ({"output_type": "display_data", "metadata": {},
                    "data": {"image/png": base64.b64encode(png).decode("ascii"),
                             "text/plain": f"<Figure: {title}>"}},)


def _fmt(value: float, signed: bool = False) -> str:
    """Two decimals, never "-0.00" (a negative number that rounds to zero reads as 0.00)."""
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text.replace("-0.00", "+0.00" if signed else "0.00")


QUANTITIES = {
    "maps_static": "MAPS score (share of pairs in top-k)",
    "maps_suppression": "MAPS suppression score (share of pairs)",
    "attention": "mean attention weight",
    "act_patch": "activation patching score",
    "attribution": "attribution patching score",
    "path_patch": "path patching score",
}


SHORT = {"maps_static": "MAPS static", "maps_suppression": "MAPS suppression", "attention": "attention",
         "act_patch": "activation patching", "attribution": "attribution patching", "path_patch": "path patching"}


def quantity(hs: HeadScores) -> str:
    """What a scoring's numbers are, for colour bars and titles (no internal method ids)."""
    return QUANTITIES.get(hs.method, hs.method.replace("_", " "))


def relation_title(name: str, hs: HeadScores) -> str:
    """A panel title: the relation's readable name, plus what the explorer's entry adds (e.g. suppression)."""
    title = plots.pretty_name(hs.target)
    if hs.target in name and name != hs.target:
        title += " " + name.replace(hs.target, "").strip()
    return title if hs.method != "attention" else hs.target.replace("ioi", "IOI")


# Shared look of the two HTML panels: readable size, room around them, cells padded, and the
# first column (source -> target, method name) never broken over two lines.
_BOX = "font-size:12px;line-height:1.35;max-width:560px;padding:4px 10px 8px 12px"
_TABLE = "border-collapse:collapse;margin:2px 0 8px 0"
_TD = "padding:2px 10px 2px 0;vertical-align:top"
_TD1 = _TD + ";white-space:nowrap"


def _views_html(data: HeadView) -> str:
    """The OV and suppression views as two small HTML tables (target in bold green)."""
    head = (f"<b>{html.escape(data.relation)}</b> · head <b>{data.head}</b>: score {_fmt(data.score)} "
            f"(rank {data.rank} of {data.n_heads}, k={data.k})")
    parts = [f"<p style='margin:0 0 6px 0'>{head}</p>"]
    for items, title in ((data.ov, "OV view: top mapped tokens"), (data.suppression, "suppression view: most suppressed")):
        rows = []
        for item in items:
            cells = []
            for tok, _ in item.top:
                text = html.escape(tok.strip() or repr(tok))
                hit = item.target is not None and tok.strip() == item.target
                cells.append(f"<b style='color:#1a7f37'>{text}</b>" if hit else text)
            tgt = html.escape(str(item.target)) if item.target is not None else "–"
            rows.append(f"<tr><td style='{_TD1}'><b>{html.escape(item.source)}</b> → {tgt}</td>"
                        f"<td style='{_TD}'>{', '.join(cells)}</td></tr>")
        body = "".join(rows) or "<tr><td colspan=2>(no sample sources for this scoring)</td></tr>"
        parts.append(f"<p style='margin:6px 0 2px 0'><i>{title}</i></p><table style='{_TABLE}'>{body}</table>")
    return f"<div style='{_BOX}'>" + "".join(parts) + "</div>"


def _patching_html(data: PatchingView) -> str:
    """The patching view: one row per registered head-scoring method."""
    rows = []
    for name, item in data.methods.items():
        if item.error is not None:
            rows.append(f"<tr><td style='{_TD1}'>{html.escape(name)}</td><td colspan=3 style='{_TD};color:#b00'>"
                        f"{html.escape(item.error)}</td></tr>")
            continue
        rows.append(f"<tr><td style='{_TD1}'>{html.escape(name)}</td>"
                    f"<td style='{_TD1};text-align:right'>{_fmt(item.score, signed=True)}</td>"
                    f"<td style='{_TD1}'>{item.rank} of {data.n_heads}</td>"
                    f"<td style='{_TD}'>{html.escape(str(item.direction))}</td></tr>")
    metrics = {item.metric for item in data.methods.values() if item.error is None}
    note = ("; metric: normalised logit difference, 1 = the head carries all of it, 0 = none, "
            "&lt; 0 = it works against the answer" if metrics == {"normalised_logit_diff"} else
            "; metrics: " + html.escape(", ".join(sorted(str(m) for m in metrics))))
    head = (f"<p style='margin:0 0 6px 0'>patching scores of head <b>{data.head}</b> on "
            f"<b>{html.escape(data.task)}</b> ({data.n_prompts} prompts{note})</p>")
    th = "padding:2px 10px 2px 0;text-align:left;white-space:nowrap"
    table = (f"<table style='{_TABLE}'><tr><th style='{th}'>method</th><th style='{th};text-align:right'>score</th>"
             f"<th style='{th}'>rank by |score|</th><th style='{th}'>direction</th></tr>" + "".join(rows) + "</table>")
    return f"<div style='{_BOX}'>" + head + table + "</div>"
