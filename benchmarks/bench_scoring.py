"""MAPS static + suppression scores: circuitlib's fast path vs a per-head loop like the MAPS authors'.

Protocol (``benchmarks/protocol.py``, issue 14): both sides run interleaved in one process, ``--reps``
times each (default 3); the printed ratio is the median of the per-pair ratios (min-max in brackets);
torch threads pinned and printed; load average before and after; scores compared on every head of
every weight set after every pair — any difference exits with status 1.

Model: gpt2-medium's shape (24 layers x 16 heads, d_model 1024, d_head 64, |V| = 50257), random init
(``circuitlib.models.random_model``, seed 0), the real GPT-2 tokenizer. Relations: the real
``name_copying`` (k = 1) and ``country_to_capital_wikidata`` (k = 10) pairs of
``circuitlib.tasks.relations``. Three weight sets, each scored on all heads:

- ``random``: the random init. Almost every (head, pair) meets k entries above its target in the first
  vocabulary chunk, so the fast path's early exit makes this its best case.
- ``planted``: ~10% of the heads (``--planted-frac``, seeded choice) get ``W_V W_O`` rewritten so that one
  relation's targets rank top for its sources (half the planted heads per relation): the reduced-rank
  least-squares map from the heads' inputs ``x_s`` to the targets' unembedding columns (best rank-64
  approximation of ``X A = W_U[:, t]^T``). Their static scores are near 1 (printed).
- ``worst``: every head planted for both relations at once: a target that ranks in the top k never lets
  its (head, pair) stop early, so nearly every static pair counts through the whole vocabulary.

Threads: the protocol pins torch's count (``--threads``) and both sides run with it, printed: the loop
as is, circuitlib's side by passing it as ``static_scores_many(threads=N)`` (its default, ``threads=None``,
would cap it at the cores other processes leave free, so the two sides could run on different counts and
the ratio would measure the thread counts, not the code).

Baseline (how ``MAPS.calc_relation_scores`` in ``amitelhelo/MAPS`` ``src/maps.py`` works, re-written
here): per relation, per head, ``W_VO = W_V W_O``, ``x_s W_VO W_U`` for every source, ``torch.topk``, target
membership, the static and the suppression score from the same projection. Fast path:
:func:`circuitlib.scoring.static_scores_many` for both relations, once for static, once for suppression.

Prints ``speedup random: <x>x``, ``speedup planted: <x>x``, ``speedup worst: <x>x`` and ends with
``speedup: <planted x>x``. Floors (issue 14): >= 5x planted, >= 1x worst (printed as met / NOT MET).

    .venv/bin/python benchmarks/bench_scoring.py            # full size, 3 interleaved pairs per set
    .venv/bin/python benchmarks/bench_scoring.py --quick    # 2 layers, to check that it runs
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import protocol  # noqa: E402
from circuitlib.models import GPT2_MEDIUM_SHAPE, random_model  # noqa: E402
from circuitlib import _cores  # noqa: E402
from circuitlib.scoring import maps_inputs, static_scores_many  # noqa: E402
from circuitlib.tasks import load_relation  # noqa: E402

RELATIONS = ["name_copying", "country_to_capital_wikidata"]
FLOORS = {"planted": 5.0, "worst": 1.0}


# ---------------------------------------------------------------------------------------------
# The two sides


@torch.no_grad()
def maps_loop(model, rels) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per relation, per head: ``W_VO``, the full projection of every source, ``torch.topk``; static and
    suppression hit rates from the same projection (the MAPS authors' structure)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_U = model.W_U
    out = {}
    for pairs in rels:
        emb = model.W_E[pairs.src]
        later = model.blocks[0].mlp(model.blocks[0].ln2(emb[None]))[0]  # MLP_0(LN2_0(W_E[s])), layers >= 1
        tgt = pairs.tgt[:, None]
        static, supp = torch.zeros(L, H), torch.zeros(L, H)
        for layer in range(L):
            attn = model.blocks[layer].attn
            for h in range(H):
                w_vo = attn.W_V[h] @ attn.W_O[h]
                projection = (emb if layer == 0 else later) @ w_vo @ W_U
                static[layer, h] = (torch.topk(projection, pairs.k).indices == tgt).any(-1).float().mean()
                supp[layer, h] = (torch.topk(-projection, pairs.k).indices == tgt).any(-1).float().mean()
        out[pairs.name] = (static, supp)
    return out


FAST_THREADS: int | None = None  # set by main() to the protocol's pinned count: both sides on the same threads


@torch.no_grad()
def fast(model, rels) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    static = static_scores_many(model, rels, threads=FAST_THREADS)
    supp = static_scores_many(model, rels, suppression=True, threads=FAST_THREADS)
    return {p.name: (static[p.name].scores, supp[p.name].scores) for p in rels}


def same_scores(a, b) -> bool:
    """Every relation's static and suppression maps bitwise equal on every head."""
    if a.keys() != b.keys():
        return False
    bad = [(name, kind) for name in a for kind, x, y in zip(("static", "suppression"), a[name], b[name])
           if not torch.equal(x, y)]
    for name, kind in bad:
        x, y = a[name][kind == "suppression"], b[name][kind == "suppression"]
        diff = (x != y).nonzero().tolist()
        print(f"  {name} {kind}: {len(diff)} heads differ, e.g. {[f'{l}.{h}' for l, h in diff[:5]]}")
    return not bad


# ---------------------------------------------------------------------------------------------
# Weight sets


@torch.no_grad()
def plant(model, layer: int, head: int, x: torch.Tensor, targets: torch.Tensor) -> None:
    """Rewrite head ``layer.head``'s ``W_V`` / ``W_O`` so that ``x[i] W_V W_O W_U`` ranks ``targets[i]`` high:
    the best rank-``d_head`` ``A`` with ``x A ~ T`` (T = the targets' unembedding columns, centred over
    the vocabulary; reduced-rank least squares), split as ``W_V = A_ls V_r``, ``W_O = V_r^T`` (zero-padded to ``d_head``)."""
    W_U = model.W_U
    T = (W_U - W_U.mean(1, keepdim=True))[:, targets].T  # [n, d]
    A_ls = torch.linalg.lstsq(x.double(), T.double()).solution  # [d, d], x A_ls = T (n < d)
    V = torch.linalg.svd(x.double() @ A_ls, full_matrices=False).Vh[: model.cfg.d_head].T  # [d, d_head]
    attn, r = model.blocks[layer].attn, V.shape[1]  # r < d_head when there are fewer pairs than d_head
    attn.W_V.data[head] = 0.0
    attn.W_O.data[head] = 0.0
    attn.W_V.data[head, :, :r] = (A_ls @ V).float()
    attn.W_O.data[head, :r] = V.T.float()


def relation_xy(model, rels, layer: int, which) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources' MAPS inputs at ``layer`` and one target per source for the relations in ``which``
    (a source listed twice keeps its first target)."""
    first: dict[int, int] = {}
    for i in which:
        for s, t in zip(rels[i].src.tolist(), rels[i].tgt.tolist()):
            first.setdefault(s, t)
    src, tgt = torch.tensor(list(first)), torch.tensor(list(first.values()))
    return maps_inputs(model, src)[layer], tgt


def make_planted(model, rels, frac: float, seed: int = 0) -> list[tuple[int, int, str]]:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    g = torch.Generator().manual_seed(seed)
    n = max(2, round(frac * L * H))
    chosen = sorted(torch.randperm(L * H, generator=g)[:n].tolist())
    planted = []
    for j, idx in enumerate(chosen):
        layer, head = divmod(idx, H)
        which = [j % len(rels)]
        plant(model, layer, head, *relation_xy(model, rels, layer, which))
        planted.append((layer, head, rels[which[0]].name))
    return planted


def make_worst(model, rels) -> None:
    for layer in range(model.cfg.n_layers):
        x, t = relation_xy(model, rels, layer, range(len(rels)))
        for head in range(model.cfg.n_heads):
            plant(model, layer, head, x, t)


def describe(scores, planted=None) -> str:
    parts = []
    for name, (static, supp) in scores.items():
        if planted is not None:
            mask = torch.zeros_like(static, dtype=torch.bool)
            for layer, head, rel in planted:
                mask[layer, head] = rel == name
            parts.append(f"{name}: static mean {static[mask].mean():.2f} on its {int(mask.sum())} planted heads "
                         f"(min {static[mask].min():.2f}), {static[~mask].mean():.3f} on the others")
        else:
            parts.append(f"{name}: static mean {static.mean():.2f} (min {static.min():.2f}), "
                         f"suppression mean {supp.mean():.3f}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 24 (checks that it runs)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default 24; --quick: 2)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each side (>= 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    parser.add_argument("--sets", default="random,planted,worst", help="weight sets to run, comma-separated")
    parser.add_argument("--planted-frac", type=float, default=0.1, help="fraction of planted heads (default 0.1)")
    args = parser.parse_args(argv)
    global FAST_THREADS
    FAST_THREADS = protocol.header(args.threads,
                                   title="MAPS static + suppression scores: per-head loop (a) vs circuitlib (b)")
    n_layers = args.layers or (2 if args.quick else GPT2_MEDIUM_SHAPE["n_layers"])
    model = random_model(dict(GPT2_MEDIUM_SHAPE, n_layers=n_layers))
    rels = [load_relation(r, model.tokenizer) for r in RELATIONS]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    print(f"model: {L} layers x {H} heads, d_model {model.cfg.d_model}, |V| = {model.cfg.d_vocab}, random init "
          f"(seed 0){' [--quick: reduced size, not a benchmark figure]' if n_layers != 24 else ''}")
    print(f"threads: both sides run on {FAST_THREADS} (the pinned count; circuitlib's side via "
          f"static_scores_many(threads={FAST_THREADS}); its own default would now choose "
          f"{min(FAST_THREADS, _cores.free_cores())}, the cores other processes leave free)")
    print("relations: " + ", ".join(f"{p.name} ({len(p)} pairs, k={p.k})" for p in rels))

    ratios = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        planted = None
        if name == "planted":
            planted = make_planted(model, rels, args.planted_frac)
        elif name == "worst":
            make_worst(model, rels)
        elif name != "random":
            raise SystemExit(f"unknown weight set {name!r}: use random, planted, worst")
        ref = fast(model, rels)
        print(f"[{name}] " + (f"{len(planted)} of {L * H} heads planted; " if planted else "") + describe(ref, planted))
        r = protocol.interleaved(lambda: maps_loop(model, rels), lambda: fast(model, rels), reps=args.reps,
                                 check=same_scores, label=name)
        ratios[name] = r
        print(r.line("ratio"))
        print(f"scores identical on all {L * H} heads, both relations, static and suppression, every pair: True")

    protocol.footer()
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    for name, floor in FLOORS.items():
        if name in ratios:
            ok = ratios[name].median >= floor
            print(f"floor {name} >= {floor:g}x: {'met' if ok else 'NOT MET'} ({ratios[name].median:.1f}x)")
    for name in ("random", "planted", "worst"):
        if name in ratios:
            print(ratios[name].line("speedup"))
    if "planted" in ratios:
        print(f"speedup: {ratios['planted'].median:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
