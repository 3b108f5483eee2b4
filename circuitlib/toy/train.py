"""Train the embedded model from scratch: ``python -m circuitlib.toy.train [--steps N] [--out DIR]``.

Architecture: GPT-2 style, **attention-only** (LayerNorm + attention, no MLPs), 3 layers x 8 heads,
d_model 128, d_head 32, context 32, untied embeddings. Attention-only on purpose: with MLPs the
country -> capital lookup moves into the MLP, where head-level MAPS scores cannot see it; without
them the lookup must live in the heads' OV circuits, which is what this project teaches.

Loss: next-token cross-entropy on every position, with the answer token of IOI, capital and Colored
Objects sentences (and the gap recalls) weighted ``ANSWER_WEIGHT`` times, plus a head group-lasso ``HEAD_L1 * sum_heads
(||W_V^h||_F + ||W_O^h||_F)`` that switches unneeded heads off (optionally off for a first fraction
of the steps and ramped in: ``--l1-start`` / ``--l1-ramp``). Without it (and with weight decay,
which rewards spreading work over heads) every task was spread over nearly all 24 heads, so no
small set of heads mattered; with it a few heads carry each task. AdamW without weight decay, fixed
seed. Before the main run, a gated curriculum (:data:`circuitlib.toy.corpus.STAGES`, :func:`run_stages`)
moves the Colored Objects lookup's query away from its answer one token at a time. Training runs with
``torch.use_deterministic_algorithms(True)``; the thread count is part of the recipe (``--threads``) and
is saved with it, because float sums, and so the weights, may differ bit by bit across thread counts.

Every option of the command line (layers, MLP blocks, data mix, learning rate, penalty schedule, ...) is
saved in the checkpoint's ``config.json`` under ``training``, with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from ..models import TOY_DIR, build_model, save_checkpoint
from .corpus import KINDS, MIX, STAGES, build_tokenizer, generate

CONFIG = dict(
    n_layers=3, d_model=128, n_ctx=32, d_head=32, n_heads=8, d_mlp=None, act_fn=None,
    attn_only=True, normalization_type="LN", positional_embedding_type="standard", seed=0,
)
# The recipe's defaults (``python -m circuitlib.toy.train`` without options; ``train()``'s defaults).
ANSWER_WEIGHT = 5.0
HEAD_L1 = 0.01
STEPS = 3500
LR = 3e-3
BATCH_SIZE = 128
N_SENTENCES = 200_000
L1_START = 0.6
L1_RAMP = 0.2
THREADS = 1
SEED = 2  # of seeds 0-2 (all meet the CI floors), the one that met the most issue-13 floors (model card, "Seeds")
LOG_EVERY = 500


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
        if s.kind in ("ioi", "capital", "colored", "gap1", "gap2", "gap3"):
            weights[i, len(toks) - 2] = ANSWER_WEIGHT  # predicting the last token (the answer)
    return ids, weights


def head_norms(model: HookedTransformer) -> Float[Tensor, "n_layers n_heads"]:
    """Per-head ||W_V||_F + ||W_O||_F, [n_layers, n_heads]: the group-lasso penalty that switches heads off."""
    return model.W_V.flatten(-2).norm(dim=-1) + model.W_O.flatten(-2).norm(dim=-1)


def heldout_accuracy(model: HookedTransformer, n: int = 64) -> dict[str, float]:
    """Accuracy (answer beats wrong answer) on ``n`` held-out prompts (seed 1) of each task the embedded
    model is trained for: ``ioi``, ``colored_objects``, ``capitals``."""
    from ..metrics import accuracy
    from ..tasks import capital_batch, colored_objects_batch, ioi_batch

    with torch.no_grad():
        out = {}
        for name, batch in (("ioi", ioi_batch(model.tokenizer, n, seed=1)),
                            ("colored_objects", colored_objects_batch(model.tokenizer, n, seed=1)),
                            ("capitals", capital_batch(model.tokenizer, n, seed=1))):
            out[name] = accuracy(model(batch.clean), batch)
    return out


def mlp_mask(model: HookedTransformer, mlp_layers: list[int] | None) -> None:
    """Zero and freeze the MLPs of blocks not in ``mlp_layers`` (TransformerLens has one ``d_mlp`` for
    all blocks): a model with MLPs in some blocks only. ``None`` (or an attention-only model) keeps
    every block as it is."""
    if mlp_layers is None or model.cfg.attn_only:
        return
    bad = [l for l in mlp_layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"mlp_layers {bad} are not blocks of a {model.cfg.n_layers}-layer model: use 0..{model.cfg.n_layers - 1}")
    for l, block in enumerate(model.blocks):
        if l in mlp_layers:
            continue
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)


def penalty_weight(step: int, steps: int, head_l1: float, l1_start: float = 0.0, l1_ramp: float = 0.0) -> float:
    """The group-lasso weight at ``step``: 0 for the first ``l1_start`` fraction of ``steps``, then linear
    up to ``head_l1`` over the next ``l1_ramp`` fraction (``l1_ramp`` 0: a step), ``head_l1`` after."""
    frac = step / steps
    if frac < l1_start:
        return 0.0
    if l1_ramp <= 0:
        return head_l1
    return head_l1 * min(1.0, (frac - l1_start) / l1_ramp)


def train(
    steps: int = STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = SEED,
    n_sentences: int = N_SENTENCES,
    log_every: int = LOG_EVERY,
    progress: bool = True,
    weight_decay: float = 0.0,
    head_l1: float = HEAD_L1,
    config: dict | None = None,
    mix: dict[str, float] | None = None,
    mlp_layers: list[int] | None = None,
    l1_start: float = L1_START,
    l1_ramp: float = L1_RAMP,
    stages: list[dict] | None = STAGES,
) -> tuple[HookedTransformer, list[float]]:
    """Train a fresh embedded model; returns ``(model, losses)`` (language-model loss per step, without
    the group-lasso term). Deterministic for a given seed and thread count
    (``torch.use_deterministic_algorithms`` is on while it trains).

    ``mix``: the corpus mix (:data:`circuitlib.toy.corpus.MIX` when ``None``). ``mlp_layers``: with a
    ``config`` that has MLPs, the blocks that keep one (:func:`mlp_mask`). ``l1_start`` / ``l1_ramp``
    (fractions of ``steps``): the head group-lasso is off for the first ``l1_start`` of training and
    ramps linearly to ``head_l1`` over the next ``l1_ramp`` (0, 0: on from the start), so circuits that
    need several layers can form before pruning starts (:func:`penalty_weight`). ``stages``: the gated
    curriculum run before the ``steps`` of the main mix (:data:`circuitlib.toy.corpus.STAGES` by default;
    ``[]``: none; :func:`run_stages`), so the model trains for ``steps`` plus the stages' steps.

    Every ``log_every`` steps prints the loss and the held-out task accuracies (when ``progress``).
    """
    if not (0 <= l1_start <= 1 and 0 <= l1_ramp <= 1):
        raise ValueError(f"l1_start={l1_start}, l1_ramp={l1_ramp}: both are fractions of the steps, in [0, 1]")
    check_stages(list(stages or []))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(steps, batch_size, lr, seed, n_sentences, log_every, progress, weight_decay, head_l1,
                      config, mix, mlp_layers, l1_start, l1_ramp, stages)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(steps, batch_size, lr, seed, n_sentences, log_every, progress, weight_decay, head_l1, config, mix,
           mlp_layers, l1_start, l1_ramp, stages) -> tuple[HookedTransformer, list[float]]:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    cfg = dict(config or CONFIG, d_vocab=len(tokenizer.get_vocab()), seed=seed)
    model = build_model(cfg, tokenizer)
    model.cfg.model_name = "toy"
    mlp_mask(model, mlp_layers)
    ids, weights = encode_corpus(tokenizer, generate(n_sentences, seed, mix), cfg["n_ctx"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    model.train()
    if stages:
        run_stages(model, opt, tokenizer, stages, seed, n_sentences, batch_size, lr, gen, losses, progress, t0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        losses.append(_step(model, opt, ids[idx], weights[idx], penalty_weight(step, steps, head_l1, l1_start, l1_ramp)))
        sched.step()
        if progress and (step % log_every == 0 or step == steps - 1):
            model.eval()
            acc = heldout_accuracy(model)
            model.train()
            print(f"step {step:5d}  loss {losses[-1]:.3f}  held-out accuracy "
                  + " ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f"  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model, losses


def check_stages(stages: list[dict]) -> None:
    """One clear ``ValueError`` for a malformed curriculum (see :data:`circuitlib.toy.corpus.STAGES`)."""
    if not isinstance(stages, list):
        raise ValueError(f"stages {stages!r}: give a list of stages (an empty list for none)")
    for i, st in enumerate(stages):
        ok = (isinstance(st, dict) and {"mix", "gate", "acc", "max"} <= set(st) <= {"mix", "gate", "acc", "max", "l1"}
              and isinstance(st["mix"], dict) and isinstance(st.get("l1", 0.0), (int, float)) and st.get("l1", 0.0) >= 0
              and st["gate"] in KINDS and isinstance(st["acc"], (int, float)) and 0 <= st["acc"] <= 1
              and isinstance(st["max"], int) and st["max"] >= 1)
        if not ok:
            raise ValueError(f"stage {i} {st!r}: give {{'mix': {{kind: weight}}, 'gate': kind, 'acc': a in [0, 1], "
                             f"'max': steps >= 1}} (optionally 'l1': head penalty >= 0) with kinds among {KINDS}")


def last_token_accuracy(model: HookedTransformer, ids: Int[Tensor, "n n_ctx"], weights: Float[Tensor, "n m"]) -> float:
    """Top-1 accuracy of each sentence's last token (predicted from the one before it)."""
    last = (weights > 0).sum(-1) - 1  # index of the last prediction
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(ids)
    model.train(was)
    rows = torch.arange(ids.shape[0])
    return (logits[rows, last].argmax(-1) == ids[rows, last + 1]).float().mean().item()


def _step(model, opt, x, w, l1_now: float = 0.0) -> float:
    """One optimiser step on token ids ``x`` with loss weights ``w``; returns the language-model loss
    (without the group-lasso term ``l1_now * sum of head norms``)."""
    logits = model(x)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    lm_loss = (ce * w.reshape(-1)).sum() / w.sum()
    loss = lm_loss + l1_now * head_norms(model).sum() if l1_now else lm_loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return lm_loss.item()


def run_stages(model, opt, tokenizer, stages, seed, n_sentences, batch_size, lr, gen, losses, progress, t0,
                check_every: int = 50, warmup: int = 100) -> None:
    """The gated curriculum (:data:`circuitlib.toy.corpus.STAGES`): stage ``i`` trains on a corpus of its own
    ``mix`` (``n_sentences // 8`` sentences, seed ``seed + 1000 + i``), at constant ``lr`` after a linear
    warm-up over the first ``warmup`` steps of all stages, with head penalty ``l1`` (optional, default 0), until the last-token top-1
    accuracy on 128 sentences of its ``gate`` kind (seed ``seed + 2000 + i``, not the training corpus)
    reaches ``acc`` (checked every ``check_every`` steps), or for ``max`` steps. Appends each step's loss to
    ``losses``; the next stage starts either way (the main run's accuracies show whether it took)."""
    n_ctx = model.cfg.n_ctx
    done = 0
    for i, st in enumerate(stages):
        sids, sw = encode_corpus(tokenizer, generate(n_sentences // 8, seed + 1000 + i, st["mix"]), n_ctx)
        eids, ew = encode_corpus(tokenizer, generate(128, seed + 2000 + i, {st["gate"]: 1.0}), n_ctx)
        acc = 0.0
        for s in range(st["max"]):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (done + 1) / warmup)
            idx = torch.randint(0, sids.shape[0], (batch_size,), generator=gen)
            losses.append(_step(model, opt, sids[idx], sw[idx], st.get("l1", 0.0)))
            done += 1
            if (s + 1) % check_every == 0:
                acc = last_token_accuracy(model, eids, ew)
                if acc >= st["acc"]:
                    break
        if progress:
            print(f"stage {i} ({st['gate']} >= {st['acc']}): {acc:.2f} after {s + 1} steps "
                  f"(loss {losses[-1]:.3f}, {time.time() - t0:.0f}s)", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser; its defaults are the recipe (``build_parser().parse_args([])``)."""
    parser = argparse.ArgumentParser(description="Retrain circuitlib's embedded model from scratch.")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=TOY_DIR)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (part of the recipe)")
    parser.add_argument("--n-layers", type=int, default=CONFIG["n_layers"])
    parser.add_argument("--d-model", type=int, default=CONFIG["d_model"])
    parser.add_argument("--n-heads", type=int, default=CONFIG["n_heads"])
    parser.add_argument("--d-head", type=int, default=CONFIG["d_head"])
    parser.add_argument("--d-mlp", type=int, default=0, help="0: attention-only (no MLPs)")
    parser.add_argument("--mlp-layers", type=str, default=None,
                        help="with --d-mlp: comma-separated blocks that keep an MLP (the others are zeroed and frozen)")
    parser.add_argument("--mix", type=str, default=None,
                        help='corpus mix as JSON, e.g. {"ioi": 0.35, "capital": 0.3, "colored": 0.2, "copy": 0.08, '
                             '"filler": 0.07} (default: circuitlib.toy.corpus.MIX)')
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--n-sentences", type=int, default=N_SENTENCES)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--head-l1", type=float, default=HEAD_L1)
    parser.add_argument("--l1-start", type=float, default=L1_START, help="fraction of the steps without head penalty")
    parser.add_argument("--l1-ramp", type=float, default=L1_RAMP, help="fraction of the steps to ramp the penalty in")
    parser.add_argument("--stages", type=str, default=None,
                        help='gated curriculum before the main run, JSON list of {"mix": {...}, "gate": kind, "acc": a, '
                             '"max": steps} (default: circuitlib.toy.corpus.STAGES; [] for none)')
    parser.add_argument("--log-every", type=int, default=LOG_EVERY, help="steps between progress lines")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The command line; writes the checkpoint (with the recipe under ``training``) to ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mix = json.loads(args.mix) if args.mix else None
        stages = json.loads(args.stages) if args.stages is not None else STAGES
        mlp_layers = [int(x) for x in args.mlp_layers.split(",")] if args.mlp_layers else None
    except ValueError as e:
        parser.error(f"--mix / --stages must be JSON (an object / a list of objects) and --mlp-layers comma-separated integers ({e})")
    try:
        check_stages(stages)
    except ValueError as e:
        parser.error(f"--stages: {e}")
    if mlp_layers is not None and not args.d_mlp:
        parser.error("--mlp-layers needs --d-mlp > 0 (the model is attention-only without it)")
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    config = dict(CONFIG, n_heads=args.n_heads, d_head=args.d_head, n_layers=args.n_layers, d_model=args.d_model)
    if args.d_mlp:
        config.update(d_mlp=args.d_mlp, act_fn="gelu", attn_only=False)
    model, losses = train(steps=args.steps, seed=args.seed, weight_decay=args.weight_decay, head_l1=args.head_l1,
                          config=config, mix=mix, mlp_layers=mlp_layers, lr=args.lr, batch_size=args.batch_size,
                          n_sentences=args.n_sentences, l1_start=args.l1_start, l1_ramp=args.l1_ramp,
                          log_every=args.log_every, stages=stages)
    recipe = {"steps": args.steps, "seed": args.seed, "threads": args.threads, "n_layers": args.n_layers,
              "d_model": args.d_model, "n_heads": args.n_heads, "d_head": args.d_head, "d_mlp": args.d_mlp,
              "mlp_layers": mlp_layers, "mix": mix or dict(MIX), "lr": args.lr, "batch_size": args.batch_size,
              "n_sentences": args.n_sentences, "weight_decay": args.weight_decay, "head_l1": args.head_l1,
              "l1_start": args.l1_start, "l1_ramp": args.l1_ramp, "answer_weight": ANSWER_WEIGHT,
              "stages": stages,
              "final_loss": round(losses[-1], 4), "train_seconds": round(time.time() - t0),
              "cpu_seconds": round(time.process_time() - c0),
              "command": "python -m circuitlib.toy.train " + " ".join(sys.argv[1:] if argv is None else argv)}
    save_checkpoint(model, args.out, extra={"training": recipe})
    print(json.dumps(recipe))


if __name__ == "__main__":
    main()
