"""Every floor of the embedded-model issue (issue 13) for a checkpoint: :func:`floors` returns a
:class:`Floors` result (JSON-able, ``to_dict()``); ``python -m circuitlib.toy.floors DIR [--json OUT]``
prints it and writes ``DIR/floors.json``. The model card (:mod:`circuitlib.toy.card`) and the slow
retraining test (``tests/test_toy.py``) read the same result.

Self-contained ablation (TransformerLens hooks on ``blocks.L.attn.hook_z``), so the floors do not depend on
the library's ablation code (:mod:`circuitlib.interventions`) that the notebooks demonstrate.

Definitions (they change numbers):

- Tasks: ``ioi`` (ABC corruption), ``capitals``, ``colored_objects``, held-out split, ``N`` = 200 prompts,
  seed 11 (as ``tests/test_toy.py``); ``copying`` (no split) is reported but is not a floor task.
- Accuracy = answer logit beats the wrong answer (two-way, chance 0.5); top-1 = answer is the argmax.
- Mean-ablation of a head: its ``z`` (hook_z, per head) replaced at every non-BOS position by its mean
  over all real non-BOS tokens of the task's *corrupted* prompts (one vector per head); BOS is left alone.
- **Live head**: mean-ablating it alone changes some floor task's mean logit difference by >= 5% of
  that task's clean logit difference (either sign). Justification: it is a causal criterion on the
  tasks the floors are about, independent of weight scale; 5% is well above the noise of 200 prompts
  for a deterministic model and low enough to count heads that carry a minor part of a task. The
  group-lasso weight norm ||W_V||_F + ||W_O||_F is printed too (the old card used > 0.1).
- Top-3 heads of a task: ``circuitlib.patching.act_patch_heads`` (noising, all positions) ``.top(3)``: the
  three largest *signed* effects, i.e. the heads that carry the behaviour most (a head whose removal helps
  the task is never among them).
- Random control: ``N_DRAWS`` = 200 random 3-sets drawn from the live heads outside the task's top 3
  (seeded); mean drop of top-1 and two-way accuracy.
- MAPS: ``circuitlib.scoring.static_scores`` for ``country_to_capital_wikidata`` (k=10) and
  ``name_copying`` (k=1). A capital head is **causal** when it scores >= 0.5 and is live on capitals
  or among the capital top 3; the floor asks that ablating the causal capital heads together drops
  capital top-1 accuracy by >= 0.5.
- IOI roles (``circuitlib.patching.path_patch``, noising, ABC): **movers** = heads whose path to the
  logits (direct path) scores >= ``ROLE_T`` (normalised logit difference lost) and that attend more
  to IO than to S2 from END; **S-inhibition-like** = non-mover heads whose path to the movers'
  queries (at END) or keys (every position) scores >= ``ROLE_T``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from ..metrics import evaluate
from ..models import load_checkpoint
from ..patching import act_patch_heads, path_patch
from ..results import Result
from ..scoring import static_scores
from ..tasks import capital_batch, colored_objects_batch, copying_batch, ioi_batch
from ..types import Head, TaskBatch, head_name

N = 200
SEED = 11
N_DRAWS = 200
LIVE_T = 0.05
ROLE_T = 0.1
FLOOR_TASKS = ("ioi", "capitals", "colored_objects")  # computation order (the random draws share one seeded stream)

# The floors, stated before any result was seen.
ACCURACY_FLOOR = 0.95
MIN_LIVE = 12
TOP3_DROP_FLOOR = 0.5
RANDOM3_DROP_CEILING = 0.1
MAPS_CAPITAL_FLOOR = 0.5
MAX_SIZE_MB = 10
MAX_TRAIN_SECONDS = 30 * 60


@dataclass
class TaskAblation(Result):
    """One task's top-3 heads against random 3-sets of the other live heads (drops: clean minus ablated).

    ``random_*`` are means over ``n_draws`` draws from ``pool`` (``None`` when the pool has fewer than 3
    heads or the task is not a floor task); ``random_worst_drop_top1``: the most harmful draw."""

    top3: list[str]
    clean_top1: float
    top3_top1: float
    drop_top1: float
    clean_acc: float
    top3_acc: float
    drop_acc: float
    random_drop_top1: float | None
    random_drop_acc: float | None
    random_worst_drop_top1: float | None
    pool: list[str]
    n_draws: int


@dataclass
class LiveHeads(Result):
    """The live heads (causal criterion, module docstring) and what else counts them.

    ``rel_change[task][head]``: (clean - ablated) / |clean| mean logit difference for every head at or
    above the threshold; ``n_incl_copying``: live when the copying task counts too; ``n_norm_gt_0_1``:
    heads with ||W_V||_F + ||W_O||_F > 0.1 (the weight criterion of the previous card)."""

    criterion: str
    threshold: float
    heads: list[str]
    n: int
    n_incl_copying: int
    n_norm_gt_0_1: int
    rel_change: dict[str, dict[str, float]]


@dataclass
class CapitalHeads(Result):
    """MAPS scores (>= 0.2 listed) and the capital floor: heads >= 0.5 on ``country_to_capital_wikidata``,
    those among the capital top 3, those causal, and capital top-1 accuracy with the causal ones ablated."""

    capital_scores: dict[str, float]
    name_copying_scores: dict[str, float]
    capital_heads: list[str]
    capital_heads_in_top3: list[str]
    capital_heads_causal: list[str]
    causal_ablated_top1: float | None
    causal_ablated_drop_top1: float | None


@dataclass
class IoiRoles(Result):
    """IOI roles from path patching (module docstring). Attention pairs are [to IO, to S2] from END for
    movers and direct-path heads, [to S2, to IO] for S-inhibition-like heads; path scores >= 0.05 listed."""

    direct_path: dict[str, float]
    direct_attention_IO_S2: dict[str, list[float]]
    movers: list[str]
    mover_attention_IO_S2: dict[str, list[float]]
    mover_name_copying: dict[str, float]
    path_to_movers_q: dict[str, float] | None
    path_to_movers_k: dict[str, float] | None
    s_inhibition: list[str]
    s_inhibition_attention_S2_IO: dict[str, list[float]]


@dataclass
class Floors(Result):
    """Every floor of issue 13 for one checkpoint (:func:`floors`).

    ``tasks[t]``: :func:`circuitlib.metrics.evaluate` on the held-out batch; ``ablation[t]``:
    :class:`TaskAblation`; ``floors``: floor name -> met (``FLOOR_NAMES`` order); ``training``: the
    recipe saved with the checkpoint (``config.json``'s ``training``); ``weights_sha256``: of its
    ``model.safetensors`` (:func:`weights_sha256`), so a stored result names the weights it belongs to."""

    checkpoint: str
    weights_sha256: str
    training: dict
    size_mb: float
    n_prompts: int
    seed: int
    tasks: dict[str, dict[str, float | int]]
    live: LiveHeads
    ablation: dict[str, TaskAblation]
    maps: CapitalHeads
    ioi_roles: IoiRoles
    floors: dict[str, bool]
    seconds: int = 0
    definitions: dict[str, float | int] = field(default_factory=lambda: {
        "live_threshold": LIVE_T, "role_threshold": ROLE_T, "n_draws": N_DRAWS})

    @classmethod
    def from_dict(cls, d: dict) -> "Floors":
        """The result back from its ``to_dict()`` (e.g. a stored ``floors.json``)."""
        return cls(**{**d, "live": LiveHeads(**d["live"]), "maps": CapitalHeads(**d["maps"]),
                      "ioi_roles": IoiRoles(**d["ioi_roles"]),
                      "ablation": {t: TaskAblation(**a) for t, a in d["ablation"].items()}})

    @property
    def failed(self) -> list[str]:
        """The floors not met."""
        return [k for k, ok in self.floors.items() if not ok]


FLOOR_NAMES = (
    "heldout_accuracy>=0.95", "checkpoint<10MB", "retraining<=30min", "live_heads>=12", "top3_drop_top1>=0.5",
    "random3_drop_top1<0.1", "ioi_two_roles", "movers_copy_names(MAPS>=0.5)", "capital_heads(MAPS>=0.5)_causal",
)


def weights_sha256(directory: Path | str) -> str:
    """SHA-256 of ``directory/model.safetensors``."""
    import hashlib

    return hashlib.sha256((Path(directory) / "model.safetensors").read_bytes()).hexdigest()


def batches(tok, n: int = N, seed: int = SEED) -> dict[str, TaskBatch]:
    """The floor batches (held-out split for the three floor tasks; copying has none)."""
    return {
        "ioi": ioi_batch(tok, n, seed=seed),
        "capitals": capital_batch(tok, n, seed=seed),
        "colored_objects": colored_objects_batch(tok, n, seed=seed),
        "copying": copying_batch(tok, n, seed=seed),
    }


@torch.no_grad()
def head_means(model: HookedTransformer, batch: TaskBatch) -> Float[Tensor, "n_layers n_heads d_head"]:
    """Each head's mean ``z`` over the real non-BOS tokens of ``batch.corrupt``."""
    _, cache = model.run_with_cache(batch.corrupt, names_filter=lambda n: n.endswith("attn.hook_z"))
    S = batch.corrupt.shape[1]
    real = torch.arange(S)[None] <= batch.end[:, None]
    real[:, 0] = False
    return torch.stack([cache[f"blocks.{l}.attn.hook_z"][real].mean(0) for l in range(model.cfg.n_layers)])


@torch.no_grad()
def ablated_many(model: HookedTransformer, batch: TaskBatch, head_sets: list[list[Head]],
                 means: Float[Tensor, "n_layers n_heads d_head"], chunk: int = 8) -> list[Float[Tensor, "batch d_vocab"]]:
    """END logits of the clean prompts for each head set mean-ablated at every non-BOS position, ``chunk``
    sets per forward pass (the batch repeated, each copy with its own head mask). Hooks are removed after."""
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(batch)
    out = []
    for i in range(0, len(head_sets), chunk):
        sets = head_sets[i : i + chunk]
        C = len(sets)
        mask = torch.zeros(C, L, H, dtype=torch.bool)
        for c, hs in enumerate(sets):
            for l, h in hs:
                mask[c, l, h] = True

        def hook(z, hook):
            l = hook.layer()
            m = mask[:, l].repeat_interleave(B, 0)[:, None, :, None]  # [C*B, 1, H, 1]
            m = m.expand(-1, z.shape[1], -1, -1).clone()
            m[:, 0] = False  # BOS untouched
            return torch.where(m, means[l][None, None].to(z), z)

        layers = sorted({l for hs in sets for l, _ in hs})
        logits = model.run_with_hooks(batch.clean.repeat(C, 1),
                                      fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook) for l in layers])
        end = batch.end.repeat(C)
        out += list(logits[torch.arange(C * B), end].reshape(C, B, -1))
    return out


def end_metrics(last: Float[Tensor, "batch d_vocab"], batch: TaskBatch) -> dict[str, float]:
    """Two-way accuracy, top-1 accuracy and mean logit difference from END logits."""
    rows = torch.arange(last.shape[0])
    ld = last[rows, batch.answer] - last[rows, batch.wrong]
    return {"accuracy": float((ld > 0).float().mean()), "top1": float((last.argmax(-1) == batch.answer).float().mean()),
            "logit_diff": float(ld.mean())}


@torch.no_grad()
def attention_to(model: HookedTransformer, batch: TaskBatch, query: str,
                 keys: list[str]) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """Mean attention from the ``query`` position to each of the ``keys`` positions, per head."""
    _, cache = model.run_with_cache(batch.clean, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    rows = torch.arange(len(batch))
    q = batch.positions[query]
    return {key: torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][rows, :, q, batch.positions[key]].mean(0)
                              for l in range(model.cfg.n_layers)]) for key in keys}


def _ablation(model, b, t, top, live, means, clean, rng) -> TaskAblation:
    m_top = end_metrics(ablated_many(model, b, [top], means)[0], b)
    pool = [h for h in live if h not in top]
    draws = []
    if len(pool) >= 3 and t in FLOOR_TASKS:
        sets = [rng.sample(pool, 3) for _ in range(N_DRAWS)]
        draws = [end_metrics(last, b) for last in ablated_many(model, b, sets, means)]

    def mean(k):
        return sum(clean[k] - d[k] for d in draws) / len(draws) if draws else None

    worst = max(draws, key=lambda d: clean["top1"] - d["top1"]) if draws else None
    return TaskAblation(
        top3=[head_name(h) for h in top], clean_top1=clean["top1"], top3_top1=m_top["top1"],
        drop_top1=clean["top1"] - m_top["top1"], clean_acc=clean["accuracy"], top3_acc=m_top["accuracy"],
        drop_acc=clean["accuracy"] - m_top["accuracy"], random_drop_top1=mean("top1"),
        random_drop_acc=mean("accuracy"), random_worst_drop_top1=(clean["top1"] - worst["top1"]) if worst else None,
        pool=[head_name(h) for h in pool], n_draws=len(draws))


def _ioi_roles(model, b, heads, copying) -> IoiRoles:
    direct = path_patch(model, b)
    att = attention_to(model, b, "END", ["IO", "S2"])
    movers = [h for h in heads if direct[h] >= ROLE_T and att["IO"][h] > att["S2"][h]]
    paths: dict[str, dict[str, float] | None] = {"q": None, "k": None}
    inhib: set[Head] = set()
    if movers:
        for inp in ("q", "k"):
            pp = path_patch(model, b, receivers=movers, receiver_input=inp,
                            receiver_positions="END" if inp == "q" else None)
            paths[inp] = {head_name(h): round(pp[h], 3) for h in heads if abs(pp[h]) >= 0.05}
            inhib |= {h for h in heads if pp[h] >= ROLE_T and h not in movers}
    pair = lambda h, a, b_: [round(float(att[a][h]), 2), round(float(att[b_][h]), 2)]  # noqa: E731
    return IoiRoles(
        direct_path={head_name(h): round(direct[h], 3) for h in heads if abs(direct[h]) >= 0.05},
        direct_attention_IO_S2={head_name(h): pair(h, "IO", "S2") for h in heads if abs(direct[h]) >= ROLE_T},
        movers=[head_name(h) for h in movers],
        mover_attention_IO_S2={head_name(h): pair(h, "IO", "S2") for h in movers},
        mover_name_copying={head_name(h): round(copying[h], 3) for h in movers},
        path_to_movers_q=paths["q"], path_to_movers_k=paths["k"],
        s_inhibition=sorted(head_name(h) for h in inhib),
        s_inhibition_attention_S2_IO={head_name(h): pair(h, "S2", "IO") for h in sorted(inhib)})


def floors(directory: Path | str, *, progress: bool = False) -> Floors:
    """Every floor of issue 13 for the checkpoint in ``directory`` (definitions: module docstring).

    About 9 minutes on one loaded CPU core for the 3-layer x 8-head model (single-head ablations of
    every head on four tasks, 200 random draws per floor task, path patching)."""
    t0 = time.time()
    directory = Path(directory)
    model = load_checkpoint(directory)
    meta = json.loads((directory / "config.json").read_text())
    bs = batches(model.tokenizer, N, SEED)
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]

    def say(text: str) -> None:
        if progress:
            print(f"[{time.time() - t0:.0f}s] {text}", flush=True)

    tasks = {t: evaluate(model, b) for t, b in bs.items()}
    means = {t: head_means(model, b) for t, b in bs.items()}
    clean = {t: end_metrics(ablated_many(model, b, [[]], means[t])[0], b) for t, b in bs.items()}

    # single-head ablations -> live heads
    rel = {}
    for t, b in bs.items():
        single = [end_metrics(last, b) for last in ablated_many(model, b, [[hd] for hd in heads], means[t])]
        rel[t] = {hd: (clean[t]["logit_diff"] - s["logit_diff"]) / abs(clean[t]["logit_diff"])
                  for hd, s in zip(heads, single)}
    live = [hd for hd in heads if max(abs(rel[t][hd]) for t in FLOOR_TASKS) >= LIVE_T]
    norms = (model.W_V.flatten(-2).norm(dim=-1) + model.W_O.flatten(-2).norm(dim=-1)).detach()
    live_res = LiveHeads(
        criterion=f"single-head mean-ablation changes some floor task's ({', '.join(FLOOR_TASKS)}) mean logit "
                  f"difference by >= {LIVE_T:.0%} of its clean value",
        threshold=LIVE_T, heads=[head_name(h) for h in live], n=len(live),
        n_incl_copying=sum(max(abs(rel[t][hd]) for t in bs) >= LIVE_T for hd in heads),
        n_norm_gt_0_1=int((norms > 0.1).sum()),
        rel_change={t: {head_name(h): round(v, 3) for h, v in rel[t].items() if abs(v) >= LIVE_T} for t in bs})
    say(f"live heads: {len(live)}")

    # top-3 vs random 3 from the other live heads
    rng = random.Random(0)
    ablation = {t: _ablation(model, b, t, act_patch_heads(model, b, direction="noising").top(3), live, means[t],
                             clean[t], rng) for t, b in bs.items()}
    say("ablations done")

    # MAPS
    cap = static_scores(model, "country_to_capital_wikidata")
    copying = static_scores(model, "name_copying")
    cap_strong = [h for h in heads if cap[h] >= MAPS_CAPITAL_FLOOR]
    cap_top = [tuple(map(int, x.split("."))) for x in ablation["capitals"].top3]
    cap_causal = [h for h in cap_strong if rel["capitals"][h] >= LIVE_T or h in cap_top]
    b = bs["capitals"]
    m_cap = end_metrics(ablated_many(model, b, [cap_causal], means["capitals"])[0], b) if cap_causal else None
    maps = CapitalHeads(
        capital_scores={head_name(h): round(cap[h], 3) for h in heads if cap[h] >= 0.2},
        name_copying_scores={head_name(h): round(copying[h], 3) for h in heads if copying[h] >= 0.2},
        capital_heads=[head_name(h) for h in cap_strong],
        capital_heads_in_top3=[head_name(h) for h in cap_strong if h in cap_top],
        capital_heads_causal=[head_name(h) for h in cap_causal],
        causal_ablated_top1=m_cap["top1"] if m_cap else None,
        causal_ablated_drop_top1=(clean["capitals"]["top1"] - m_cap["top1"]) if m_cap else None)

    roles = _ioi_roles(model, bs["ioi"], heads, copying)
    say("path patching done")

    tr = meta.get("training", {})
    size_mb = round((directory / "model.safetensors").stat().st_size / 2**20, 2)
    verdict = dict(zip(FLOOR_NAMES, (
        all(tasks[t]["accuracy"] >= ACCURACY_FLOOR for t in FLOOR_TASKS),
        size_mb < MAX_SIZE_MB,
        # one thread: its CPU time is the wall time on an idle core (a shared machine's wall time is not)
        (tr.get("cpu_seconds") or tr.get("train_seconds") or float("inf")) <= MAX_TRAIN_SECONDS,
        len(live) >= MIN_LIVE,
        all(ablation[t].drop_top1 >= TOP3_DROP_FLOOR for t in FLOOR_TASKS),
        all(ablation[t].random_drop_top1 is not None and ablation[t].random_drop_top1 < RANDOM3_DROP_CEILING
            for t in FLOOR_TASKS),
        bool(roles.movers) and bool(roles.s_inhibition),
        bool(roles.movers) and all(v >= 0.5 for v in roles.mover_name_copying.values()),
        maps.causal_ablated_drop_top1 is not None and maps.causal_ablated_drop_top1 >= TOP3_DROP_FLOOR,
    )))
    return Floors(checkpoint=str(directory), weights_sha256=weights_sha256(directory), training=tr, size_mb=size_mb, n_prompts=N, seed=SEED, tasks=tasks,
                  live=live_res, ablation=ablation, maps=maps, ioi_roles=roles, floors=verdict,
                  seconds=round(time.time() - t0))


def summary(res: Floors) -> str:
    """The floors as plain text (what the command line prints)."""
    tr = res.training
    lines = [f"checkpoint {res.checkpoint}  size {res.size_mb} MB  train {tr.get('train_seconds')} s wall, "
             f"{tr.get('cpu_seconds')} s CPU"]
    for t, r in res.tasks.items():
        lines.append(f"  {t:16s} acc {r['accuracy']:.3f} top1 {r['top1_accuracy']:.3f} ld {r['logit_diff']:.2f}")
    lv = res.live
    lines.append(f"  live heads {lv.n} (incl. copying {lv.n_incl_copying}; norm>0.1: {lv.n_norm_gt_0_1}): "
                 + " ".join(lv.heads))
    for t, r in res.ablation.items():
        rd = r.random_drop_top1
        lines.append(f"  {t:16s} top3 {','.join(r.top3)}: top1 {r.clean_top1:.2f}->{r.top3_top1:.2f} "
                     f"(drop {r.drop_top1:.2f}); acc {r.clean_acc:.2f}->{r.top3_acc:.2f}; random3 "
                     + (f"top1 drop {rd:.3f} acc drop {r.random_drop_acc:.3f} worst {r.random_worst_drop_top1:.2f}"
                        if rd is not None else "n/a"))
    m = res.maps
    lines.append(f"  MAPS capital >=0.5: {m.capital_heads} in top3 {m.capital_heads_in_top3} "
                 f"causal {m.capital_heads_causal} ablated top1 drop {m.causal_ablated_drop_top1}")
    lines.append(f"  MAPS capital scores {m.capital_scores}")
    lines.append(f"  MAPS name copying {m.name_copying_scores}")
    r = res.ioi_roles
    lines.append(f"  IOI direct path {r.direct_path} attn END->IO/S2 {r.direct_attention_IO_S2}")
    lines.append(f"  IOI movers {r.movers} attn IO/S2 {r.mover_attention_IO_S2} copy {r.mover_name_copying}")
    lines.append(f"  IOI path->movers q {r.path_to_movers_q} k {r.path_to_movers_k}")
    lines.append(f"  IOI S-inhibition-like {r.s_inhibition} attn S2/IO {r.s_inhibition_attention_S2_IO}")
    lines.append("  FLOORS " + " ".join(f"{k}={'Y' if v else 'n'}" for k, v in res.floors.items()))
    return "\n".join(lines)


def row(res: Floors, name: str) -> str:
    """One markdown table row of the attempt log (docs/exp13/EXPERIMENTS.md's summary table)."""
    t, a, m, r = res.tasks, res.ablation, res.maps, res.ioi_roles
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    tr = res.training
    return (f"| {name} | {tr.get('seed')} | {round((tr.get('cpu_seconds') or tr.get('train_seconds') or 0) / 60, 1)} | "
            + " / ".join(f"{t[k]['accuracy']:.2f}" for k in FLOOR_TASKS) + " | "
            + f"{res.live.n} | "
            + " / ".join(fmt(a[k].drop_top1) for k in FLOOR_TASKS) + " | "
            + " / ".join(fmt(a[k].random_drop_top1) for k in FLOOR_TASKS) + " | "
            + f"{','.join(r.movers) or '-'} ({', '.join(f'{v:.2f}' for v in r.mover_name_copying.values()) or '-'}) | "
            + f"{','.join(r.s_inhibition) or '-'} | "
            + f"{','.join(m.capital_heads_causal) or '-'} ({fmt(m.causal_ablated_drop_top1)}) |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Every floor of the embedded-model issue for a checkpoint directory.")
    p.add_argument("directory", type=Path)
    p.add_argument("--json", type=Path, default=None, help="where to write the result (default DIR/floors.json)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = floors(args.directory, progress=True)
    (args.json or args.directory / "floors.json").write_text(res.to_json(indent=1) + "\n")
    print(summary(res))


if __name__ == "__main__":
    main()
