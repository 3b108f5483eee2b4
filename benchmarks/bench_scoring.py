"""MAPS static scores: circuitlib's fast path vs a per-head loop like MAPS's, in the same run.

Model: random-weight gpt2-medium-shaped (24 x 16 heads, d_model 1024, |V| = 50257) with the real
GPT-2 tokenizer. Relations: name_copying (k=1) + country_to_capital_wikidata (k=10), all 384 heads.

Baseline (MAPS's ``calc_relation_scores``): per relation, per head: W_VO = W_V W_O, the full
``x_s W_VO W_U`` logits for the relation's sources, ``torch.topk``, target membership.
Fast path: :func:`circuitlib.scoring.static_scores_many` (early-exit top-k counting).
Prints both times, their ratio, agreement, peak memory (max RSS); last line ``speedup: <ratio>x``.

    .venv/bin/python benchmarks/bench_scoring.py [--heads N]   # N: baseline on the first N heads only
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from circuitlib.models import random_model  # noqa: E402
from circuitlib.scoring import static_scores_many  # noqa: E402
from circuitlib.tasks import load_relation  # noqa: E402

RELATIONS = ["name_copying", "country_to_capital_wikidata"]


@torch.no_grad()
def maps_loop(model, relations, heads):
    """MAPS's per-head loop (static scores only), one relation at a time."""
    out = {}
    for pairs in relations:
        emb = model.W_E[pairs.src]
        later = model.blocks[0].mlp(model.blocks[0].ln2(emb[None]))[0]
        scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        for l, h in heads:
            attn = model.blocks[l].attn
            w_vo = attn.W_V[h] @ attn.W_O[h]
            projection = (emb if l == 0 else later) @ w_vo @ model.W_U
            top = torch.topk(projection, pairs.k, dim=-1).indices
            scores[l, h] = (top == pairs.tgt[:, None]).any(-1).float().mean()
        out[pairs.name] = scores
    return out


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=None, help="baseline on the first N heads only (extrapolated)")
    args = parser.parse_args()

    model = random_model()
    rels = [load_relation(r, model.tokenizer) for r in RELATIONS]
    all_heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    heads = all_heads[: args.heads] if args.heads else all_heads
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers}x{model.cfg.n_heads} heads, |V|={model.cfg.d_vocab}), "
          f"threads: {torch.get_num_threads()}")
    print("relations: " + ", ".join(f"{p.name} ({len(p)} pairs, k={p.k})" for p in rels))
    rss_model = max_rss_gib()

    t0 = time.perf_counter()
    fast = static_scores_many(model, rels)
    t_fast = time.perf_counter() - t0
    rss_fast = max_rss_gib()

    t0 = time.perf_counter()
    slow = maps_loop(model, rels, heads)
    t_slow = time.perf_counter() - t0
    if len(heads) < len(all_heads):
        t_slow *= len(all_heads) / len(heads)
        print(f"baseline run on {len(heads)} heads, time extrapolated to {len(all_heads)}")

    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for l, h in heads:
        mask[l, h] = True
    agree = all(torch.equal(fast[p.name].scores[mask], slow[p.name][mask]) for p in rels)
    print(f"scores identical on the {len(heads)} baseline heads: {agree}")
    print(f"fast path (static_scores_many): {t_fast:8.2f} s")
    print(f"per-head MAPS loop:             {t_slow:8.2f} s")
    print(f"peak memory (max RSS): {rss_fast:.2f} GiB after the fast path (model alone: {rss_model:.2f} GiB), "
          f"{max_rss_gib():.2f} GiB at the end")
    print(f"speedup: {t_slow / t_fast:.1f}x")


if __name__ == "__main__":
    main()
