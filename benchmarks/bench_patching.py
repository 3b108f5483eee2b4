"""All-heads activation patching on a random-weight gpt2-medium-shaped model: circuitlib vs TransformerLens.

Same model, same IOI prompts, same run: ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``
(one full forward per head, 24 x 16 = 384 forwards) against ``circuitlib.patching.act_patch_heads``
(denoising, TransformerLens's convention: clean head outputs patched into the corrupted run).
Also prints the cost of attribution patching in forward-equivalents (wall time / one forward pass).

    python benchmarks/bench_patching.py [--n 8] [--tl-heads 48 | --full]

TransformerLens's loop runs one full forward per head, and every forward costs the same, so by default
it is timed on ``--tl-heads`` heads spread over all layers (``index_df``) and its all-heads time is that
per-head time x 384 (printed as an extrapolation); ``--full`` times all 384 heads (slow on 2 cores).
Results are compared on every head TransformerLens computed. The last line reads ``speedup: <ratio>x``.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="number of IOI prompts (default 8)")
    parser.add_argument("--tl-heads", type=int, default=48, help="heads timed in TransformerLens's loop")
    parser.add_argument("--full", action="store_true", help="run TransformerLens on all heads")
    args = parser.parse_args()
    import pandas as pd

    from transformer_lens import patching as tl_patching

    from circuitlib.metrics import logit_diff
    from circuitlib.models import random_model
    from circuitlib.patching import act_patch_heads, attribution_patch_heads
    from circuitlib.tasks import ioi_batch

    torch.manual_seed(0)
    model = random_model()
    batch = ioi_batch(model.tokenizer, args.n)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers}x{model.cfg.n_heads} heads, d_model "
          f"{model.cfg.d_model}); {len(batch)} IOI prompts x {batch.clean.shape[1]} tokens; "
          f"torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        t0 = time.perf_counter()
        clean_logits, clean_cache = model.run_with_cache(batch.clean)
        corrupt_logits = model(batch.corrupt)
        t_fwd = (time.perf_counter() - t0) / 2
    clean, corrupt = logit_diff(clean_logits, batch), logit_diff(corrupt_logits, batch)

    def metric(logits):
        return (logit_diff(logits, batch) - corrupt) / (clean - corrupt)

    L, H = model.cfg.n_layers, model.cfg.n_heads
    n_tl = L * H if args.full else min(args.tl_heads, L * H)
    picked = torch.linspace(0, L * H - 1, n_tl).round().long()  # spread over all layers
    index_df = pd.DataFrame({"layer": (picked // H).numpy(), "head": (picked % H).numpy()})
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = tl_patching.get_act_patch_attn_head_out_all_pos(
            model, batch.corrupt, clean_cache, metric, index_axis_names=None, index_df=index_df)
    t_loop = time.perf_counter() - t0
    t_tl = t_loop * (L * H) / n_tl + t_fwd  # TransformerLens also needs the clean cache
    how = "measured" if n_tl == L * H else f"extrapolated from {n_tl} heads timed ({t_loop:.1f} s)"
    print(f"TransformerLens get_act_patch_attn_head_out_all_pos, all {L * H} heads: {t_tl:.2f} s ({how})")

    t0 = time.perf_counter()
    ours = act_patch_heads(model, batch, direction="denoising")
    t_ours = time.perf_counter() - t0
    print(f"circuitlib act_patch_heads (denoising, incl. both caches): {t_ours:.2f} s")
    diff = float((ours.scores.flatten()[picked] - ref.cpu()).abs().max())
    print(f"max abs diff on the {n_tl} heads both computed: {diff:.2e}  (identical results: {diff < 1e-4})")

    t0 = time.perf_counter()
    attr = attribution_patch_heads(model, batch, direction="denoising")
    t_attr = time.perf_counter() - t0
    corr = float(torch.corrcoef(torch.stack([attr.scores.flatten(), ours.scores.flatten()]))[0, 1])
    print(f"attribution patching: {t_attr:.2f} s = {t_attr / t_fwd:.2f} forward-equivalents "
          f"(one forward {t_fwd:.2f} s; passes {attr.meta['passes']}); corr with exact {corr:.3f}")
    print(f"speedup: {t_tl / t_ours:.1f}x")


if __name__ == "__main__":
    main()
