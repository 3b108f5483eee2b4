"""All-heads activation patching on a random-weight gpt2-medium-shaped model: circuitlib vs TransformerLens,
its distance from the analytic floor, and the AtP*-screened search (issue 14, asks 3 and 4).

Same model, same IOI prompts, same process, run under ``benchmarks/protocol.py`` (interleaved A/B pairs,
>= 3 each, median of per-pair ratios with min-max, threads and load printed, exit 1 on any mismatch):

1. **Floor**: the analytic cost of exact all-heads patching in forward-equivalents (FLOPs / FLOPs of one
   plain forward of the batch as given: ``B x S`` tokens, logits at every position), counting only what
   the method cannot avoid: the base run up to each prompt's END with logits at END only; the source
   run from each prompt's first clean/corrupt difference (the shared prefix reused); per patched head
   in layer ``l``: layer ``l``'s MLP and the head's ``W_O`` and all layers above, on the positions from
   the first difference to END, logits at END only. Matmul multiply-adds (projections, attention
   scores over the keys each position sees, MLP, unembedding); LayerNorms and softmaxes left out.
   Measured cost = wall time of ``act_patch_heads`` / median wall time of one plain forward, same run.
   Prints ``exact cost / floor: <x>``.
2. **Screen**: ``act_patch_screened`` (top ``--top-k`` heads, default 10) vs full exact patching,
   interleaved; prints ``screen time / exact time: <f>`` (median of per-pair ratios) and checks that the
   screen's verified values equal the exact ones and that the exact top-k is verified. Then the
   **oracle** vs full exact patching, interleaved: the least any method that reports exact values for the
   top-k can spend (the two cached runs plus exact patches of the true top-k heads only, known in advance;
   no screen, no search); prints ``oracle time / exact time: <f>``, the floor under the screen's ratio.
3. **TransformerLens**: ``get_act_patch_attn_head_out_all_pos`` (one full forward per head) timed on
   ``--tl-heads`` heads spread over all layers and extrapolated to all (``scale_a``), against
   ``act_patch_heads`` (denoising, its convention); results compared on every head it computed.
   The last line is ``speedup: <exact vs TransformerLens>x``.

    python benchmarks/bench_patching.py [--n 8] [--tl-heads 48] [--reps 3] [--quick]

``--quick``: a 6-layer, d_model 256 model of the same architecture and 2 prompts, to check the script
runs (numbers not meaningful).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# TransformerLens's per-head progress bar; set before torch, which imports tqdm (tqdm reads it at import)
os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from protocol import footer, header, interleaved, mismatch  # noqa: E402

QUICK_SHAPE = dict(n_layers=6, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=50257, n_ctx=256)


def layer_macs(cfg, ctx: int) -> float:
    """Multiply-adds of one block on one token that attends to ``ctx`` keys."""
    d, H, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    kv = cfg.n_key_value_heads or H
    proj = d * H * dh * 2 + d * kv * dh * 2  # Q, O; K, V
    mlp = 0 if cfg.attn_only or cfg.d_mlp is None else 2 * d * cfg.d_mlp * (1.5 if cfg.gated_mlp else 1)
    return proj + mlp + 2 * H * dh * ctx


def mlp_macs(cfg) -> float:
    return 0 if cfg.attn_only or cfg.d_mlp is None else 2 * cfg.d_model * cfg.d_mlp * (1.5 if cfg.gated_mlp else 1)


def analytic_floor(model, batch) -> dict:
    """Floor of exact all-heads patching in forward-equivalents (see the module docstring)."""
    cfg = model.cfg
    L, H, d, V = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab
    B, S = batch.clean.shape
    differs = batch.clean != batch.corrupt
    s = torch.where(differs.any(1), differs.float().argmax(1), batch.end).tolist()
    end = batch.end.tolist()
    forward = B * S * d * V + sum(L * layer_macs(cfg, t + 1) for _ in range(B) for t in range(S))
    base = sum(L * layer_macs(cfg, t + 1) for b in range(B) for t in range(end[b] + 1)) + B * d * V
    source = sum(L * layer_macs(cfg, t + 1) for b in range(B) for t in range(s[b], end[b] + 1)) + B * d * V
    heads = 0.0
    for l in range(L):
        per_pos = sum(mlp_macs(cfg) + cfg.d_head * d + (L - 1 - l) * layer_macs(cfg, t + 1)
                      for b in range(B) for t in range(s[b], end[b] + 1))
        heads += H * (per_pos + B * d * V)
    recomputed = sum(end[b] + 1 - s[b] for b in range(B))
    return {"fe": (base + source + heads) / forward, "caches_fe": (base + source) / forward,
            "heads_fe": heads / forward, "positions_recomputed": recomputed, "positions": B * S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="IOI prompts (default 8, --quick 2)")
    parser.add_argument("--screen-n", type=int, default=None,
                        help="IOI prompts for the screen-vs-exact comparison (default 4, --quick 2)")
    parser.add_argument("--tl-heads", type=int, default=None, help="heads timed in TransformerLens's loop (48)")
    parser.add_argument("--top-k", type=int, default=10, help="heads the screened search must find (10)")
    parser.add_argument("--min-fraction", type=float, default=None,
                        help="instead of top-k: every head >= this fraction of the largest |effect| (e.g. 0.05)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved pairs per comparison (>= 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small model, 2 prompts: checks the script runs")
    args = parser.parse_args()
    n = args.n or (2 if args.quick else 8)
    screen_n = args.screen_n or (2 if args.quick else 4)
    tl_heads = args.tl_heads or (8 if args.quick else 48)
    n_threads = header(args.threads, title="bench_patching: exact patching floor, AtP* screen, TransformerLens")
    # circuitlib's calls would cap their threads at the free cores; pinned here like the baselines'
    print(f"threads: every side runs on {n_threads} (circuitlib's calls get threads={n_threads})")

    import pandas as pd
    from transformer_lens import patching as tl_patching

    from circuitlib.metrics import logit_diff
    from circuitlib.models import random_model
    from circuitlib.patching import act_patch_heads, act_patch_screened
    from circuitlib.tasks import ioi_batch

    model = random_model(QUICK_SHAPE if args.quick else "gpt2-medium")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    batch = ioi_batch(model.tokenizer, n)
    print(f"model: {model.cfg.model_name} ({L}x{H} heads, d_model {model.cfg.d_model}); {len(batch)} IOI prompts "
          f"x {batch.clean.shape[1]} tokens (quick: {args.quick})", flush=True)

    # 1. floor -------------------------------------------------------------------------------
    floor = analytic_floor(model, batch)
    with torch.no_grad():
        model(batch.clean)  # warm-up
        fwd = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(batch.clean)
            fwd.append(time.perf_counter() - t0)
    t_fwd = statistics.median(fwd)
    costs = []
    for i in range(args.reps):
        t0 = time.perf_counter()
        act_patch_heads(model, batch, direction="denoising", threads=n_threads)
        costs.append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(batch.clean)
            fwd.append(time.perf_counter() - t0)
    t_fwd = statistics.median(fwd)
    measured = statistics.median(costs) / t_fwd
    print(f"one plain forward ({len(batch)}x{batch.clean.shape[1]} tokens, logits everywhere): median {t_fwd:.3f} s "
          f"over {len(fwd)} runs interleaved with the patching runs")
    print(f"analytic floor: {floor['fe']:.2f} forward-equivalents (caches {floor['caches_fe']:.2f}, {L * H} heads "
          f"{floor['heads_fe']:.2f}; {floor['positions_recomputed']} of {floor['positions']} token positions "
          f"recomputed per patched head)")
    print(f"measured act_patch_heads: median {statistics.median(costs):.2f} s = {measured:.2f} forward-equivalents "
          f"(runs {', '.join(f'{c:.2f}' for c in costs)} s)")
    print(f"exact cost / floor: {measured / floor['fe']:.2f}", flush=True)

    # 2. screen vs exact ---------------------------------------------------------------------
    sbatch = ioi_batch(model.tokenizer, screen_n)
    k = args.top_k

    def check_screen(full, scr):
        full_s = full.scores.flatten()
        v = scr.verified.flatten()
        same = float((scr.exact.flatten()[v] - full_s[v]).abs().max()) < 1e-4
        top = full_s.abs().argsort(descending=True)[:k]
        big = full_s.abs() >= 0.05 * full_s.abs().max()
        want = top if args.min_fraction is None else (
            full_s.abs() >= args.min_fraction * full_s.abs().max()).nonzero().flatten()
        found = bool(v[want].all())
        p, m = scr.meta["passes"], scr.meta
        print(f"    screen: {int(v.sum())} of {L * H} heads verified ({scr.stopped}; bound {scr.bound:.3g} vs threshold "
              f"{scr.threshold:.3g}); {p['single_head_patches']} single-head and {p['subset_patches']} subset "
              f"patches in {len(scr.rounds)} rounds, {p['copy_layers']} copy-layers (full exact: "
              f"{H * L * (L + 1) // 2}); screen stage {m['screen_seconds']:.1f} s of {m['seconds']:.1f} s")
        print(f"    verified values equal exact: {same}; target heads all verified: {found} "
              f"({'top ' + str(k) if args.min_fraction is None else f'>= {args.min_fraction:g} of the largest'}); "
              f"heads >= 5% of the largest |effect|: {int(big.sum())}")
        return same and found

    def screened():
        return act_patch_screened(model, sbatch, top_k=None if args.min_fraction else k,
                                  min_fraction=args.min_fraction, threads=n_threads)

    r = interleaved(lambda: act_patch_heads(model, sbatch, threads=n_threads), screened, reps=args.reps, check=check_screen,
                    label="screen")
    target = f"top {k}" if args.min_fraction is None else f"every head >= {args.min_fraction:g} of the largest"
    print(f"screened search ({target}, {len(sbatch)} prompts) vs full exact patching: exact / screen "
          f"{r.median:.2f}x (min {r.lo:.2f}, max {r.hi:.2f})")
    print(f"screen time / exact time: {1 / r.median:.3f} (per pair: {', '.join(f'{1 / x:.3f}' for x in r.ratios)})",
          flush=True)

    # 2b. oracle: caches + exact patches of the true top-k only -------------------------------------
    from circuitlib.patching import _patch_masks, _setup

    truth = act_patch_heads(model, sbatch, threads=n_threads).scores.flatten()
    top = truth.abs().argsort(descending=True)[:k]
    print(f"    exact top {k} heads by layer: {sorted((top // H).tolist())}")

    def oracle():
        setup = _setup(model, sbatch, "noising", "logit_diff", lambda n: n.endswith("attn.hook_z"))
        masks = torch.zeros(k, L * H, dtype=torch.bool)
        masks[torch.arange(k), top] = True
        return setup.score(_patch_masks(setup, masks.view(k, L, H)))

    def check_oracle(full, values):
        diff = float((values - full.scores.flatten()[top]).abs().max())
        print(f"    oracle's top-{k} values vs full exact patching: max abs diff {diff:.1e}")
        return diff < 1e-4

    r = interleaved(lambda: act_patch_heads(model, sbatch, threads=n_threads), oracle, reps=args.reps, check=check_oracle,
                    label="oracle")
    print(f"oracle time / exact time: {1 / r.median:.3f} (per pair: {', '.join(f'{1 / x:.3f}' for x in r.ratios)}; "
          f"caches + the true top {k} patched exactly, nothing else)", flush=True)

    # 3. TransformerLens ----------------------------------------------------------------------
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(batch.clean)
        corrupt_logits = model(batch.corrupt)
    clean, corrupt = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)

    def metric(logits):
        return (logit_diff(logits, batch) - corrupt) / (clean - corrupt)

    n_tl = min(tl_heads, L * H)
    picked = torch.linspace(0, L * H - 1, n_tl).round().long()  # spread over all layers
    index_df = pd.DataFrame({"layer": (picked // H).numpy(), "head": (picked % H).numpy()})

    def tl_run():
        with torch.no_grad():
            return tl_patching.get_act_patch_attn_head_out_all_pos(
                model, batch.corrupt, clean_cache, metric, index_axis_names=None, index_df=index_df).cpu()

    def check_tl(ref, ours):
        diff = float((ours.scores.flatten()[picked] - ref).abs().max())
        print(f"    max abs diff on the {n_tl} heads both computed: {diff:.2e}")
        return diff < 1e-4

    r = interleaved(tl_run, lambda: act_patch_heads(model, batch, direction="denoising", threads=n_threads), reps=args.reps,
                    check=check_tl, label="exact vs TransformerLens", scale_a=(L * H) / n_tl)
    print(r.line())
    footer()
    print(f"speedup: {r.median:.1f}x")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        mismatch("interrupted")
