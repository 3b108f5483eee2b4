"""Train the embedded model from scratch: ``python -m circuitlib.toy.train [--steps N] [--out DIR]``.

Architecture: GPT-2 style, **attention-only** (LayerNorm + attention, no MLPs), 3 layers x 8 heads,
d_model 128, d_head 32, context 32, untied embeddings. Attention-only on purpose: with MLPs the
country -> capital lookup moves into the MLP, where head-level MAPS scores cannot see it; without
them the lookup must live in the heads' OV circuits, which is what this project teaches.

Loss: next-token cross-entropy on every position, with the answer token of IOI and capital
sentences weighted ``ANSWER_WEIGHT`` times, plus a head group-lasso ``HEAD_L1 * sum_heads
(||W_V^h||_F + ||W_O^h||_F)`` that switches unneeded heads off. Without it (and with weight decay,
which rewards spreading work over heads) every task was spread over nearly all 24 heads, so no
small set of heads mattered; with it a few heads carry each task. AdamW without weight decay,
fixed seed, 1500 steps: about 8 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from ..models import TOY_DIR, build_model, save_checkpoint
from .corpus import build_tokenizer, generate

CONFIG = dict(
    n_layers=3, d_model=128, n_ctx=32, d_head=32, n_heads=8, d_mlp=None, act_fn=None,
    attn_only=True, normalization_type="LN", positional_embedding_type="standard", seed=0,
)
ANSWER_WEIGHT = 5.0
HEAD_L1 = 0.02
STEPS = 1500


def encode_corpus(tokenizer, sentences, n_ctx: int) -> tuple[Int[Tensor, "n n_ctx"], Float[Tensor, "n n_ctx_minus_1"]]:
    """Token ids [n, n_ctx] (BOS first, right-padded), loss weights [n, n_ctx - 1]."""
    bos = tokenizer.bos_token_id
    enc = tokenizer(
        [s.text for s in sentences], add_special_tokens=False, return_attention_mask=False
    )["input_ids"]
    ids = torch.full((len(enc), n_ctx), bos, dtype=torch.long)
    weights = torch.zeros(len(enc), n_ctx - 1)
    for i, (toks, s) in enumerate(zip(enc, sentences)):
        toks = [bos] + toks[: n_ctx - 1]
        ids[i, : len(toks)] = torch.tensor(toks)
        weights[i, : len(toks) - 1] = 1.0
        if s.kind in ("ioi", "capital"):
            weights[i, len(toks) - 2] = ANSWER_WEIGHT  # predicting the last token (the answer)
    return ids, weights


def head_norms(model: HookedTransformer) -> Float[Tensor, "n_layers n_heads"]:
    """Per-head ||W_V||_F + ||W_O||_F, [n_layers, n_heads]: the group-lasso penalty that switches heads off."""
    return model.W_V.flatten(-2).norm(dim=-1) + model.W_O.flatten(-2).norm(dim=-1)


def heldout_accuracy(model: HookedTransformer, n: int = 64) -> dict[str, float]:
    """Accuracy (answer beats wrong answer) on held-out IOI and capital prompts."""
    from ..metrics import accuracy
    from ..tasks import capital_batch, ioi_batch

    with torch.no_grad():
        out = {}
        for name, batch in (("ioi", ioi_batch(model.tokenizer, n, seed=1)),
                            ("capitals", capital_batch(model.tokenizer, n, seed=1))):
            out[name] = accuracy(model(batch.clean), batch)
    return out


def train(
    steps: int = STEPS,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    n_sentences: int = 200_000,
    log_every: int = 500,
    progress: bool = True,
    weight_decay: float = 0.0,
    head_l1: float = HEAD_L1,
    config: dict | None = None,
) -> tuple[HookedTransformer, list[float]]:
    """Train a fresh embedded model; returns ``(model, losses)`` (language-model loss per step, without
    the group-lasso term). Deterministic for a given seed.

    Every ``log_every`` steps prints the loss and the held-out task accuracies (when ``progress``).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    cfg = dict(config or CONFIG, d_vocab=len(tokenizer.get_vocab()), seed=seed)
    model = build_model(cfg, tokenizer)
    model.cfg.model_name = "toy"
    ids, weights = encode_corpus(tokenizer, generate(n_sentences, seed), cfg["n_ctx"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        x, w = ids[idx], weights[idx]
        logits = model(x)[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        lm_loss = (ce * w.reshape(-1)).sum() / w.sum()
        loss = lm_loss + head_l1 * head_norms(model).sum() if head_l1 else lm_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(lm_loss.item())
        if progress and (step % log_every == 0 or step == steps - 1):
            model.eval()
            acc = heldout_accuracy(model)
            model.train()
            print(f"step {step:5d}  loss {lm_loss:.3f}  held-out accuracy ioi {acc['ioi']:.2f} "
                  f"capitals {acc['capitals']:.2f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Retrain circuitlib's embedded model from scratch.")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TOY_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--head-l1", type=float, default=HEAD_L1)
    parser.add_argument("--n-heads", type=int, default=CONFIG["n_heads"])
    parser.add_argument("--d-head", type=int, default=CONFIG["d_head"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    config = dict(CONFIG, n_heads=args.n_heads, d_head=args.d_head)
    model, losses = train(steps=args.steps, seed=args.seed, weight_decay=args.weight_decay,
                          head_l1=args.head_l1, config=config)
    recipe = {"steps": args.steps, "seed": args.seed, "head_l1": args.head_l1, "weight_decay": args.weight_decay,
              "d_head": args.d_head, "n_heads": args.n_heads, "final_loss": round(losses[-1], 4),
              "train_seconds": round(time.time() - t0), "command": "python -m circuitlib.toy.train"}
    save_checkpoint(model, args.out, extra={"training": recipe})
    print(json.dumps(recipe))


if __name__ == "__main__":
    main()
