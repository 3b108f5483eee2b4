"""circuitlib on the command line: MAPS relations, head scores and the full report.

  relations  per MAPS relation, the pairs kept / total and whether the relation is valid for a model's
             tokenizer (no weights are loaded)
  scores     MAPS static (or suppression) scores of every head for one relation
  report     the whole pipeline; writes summary.json, report.md and the figures to a directory
  rehearse   the report on a random-weight model in a hub-format cache, offline (default gpt2-medium):
             wall time per section and peak memory, before you run it on the real weights

MODEL is 'toy' (the embedded model, offline), a TransformerLens name such as gpt2-medium (read from
the Hugging Face cache, downloaded only when hub access is on), or a local Hugging Face model
directory (save_pretrained output: config.json, weights, tokenizer files).
Results go to stdout; progress and library messages go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXAMPLES = """examples:
  python -m circuitlib relations --model gpt2
  python -m circuitlib scores --model toy --relation name_copying --json
  python -m circuitlib scores --model gpt2-medium --relation adj_antonym --min-pairs 20
  python -m circuitlib report --model toy --out report
  python -m circuitlib report --model gpt2-medium --out report-gpt2m --plan discovery_prompts=32
  python -m circuitlib rehearse gpt2-medium --out rehearsal-gpt2m
"""
MODEL_HELP = "'toy' (default), a TransformerLens name such as gpt2-medium, or a local Hugging Face directory"


class CLIError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def cli_relations(args: argparse.Namespace) -> str:
    from .models import load_tokenizer
    from .tasks import relation_table

    rows = relation_table(load_tokenizer(args.model), min_pairs=args.min_pairs)
    if args.json:
        return json.dumps({"model": args.model, "min_pairs": args.min_pairs, "relations": rows}, indent=2)
    width = max(len(r["relation"]) for r in rows)
    lines = [f"{'relation':<{width}}  kept/total   k  valid (>= {args.min_pairs} pairs) for {args.model}"]
    for r in rows:
        lines.append(f"{r['relation']:<{width}}  {r['kept']:>4}/{r['total']:<5}  {r['k']:>2}  "
                     f"{'yes' if r['valid'] else 'no'}")
    return "\n".join(lines)


def cli_scores(args: argparse.Namespace) -> str:
    from .models import load_model
    from .scoring import static_scores
    from .tasks import load_relation

    model = load_model(args.model)
    pairs = load_relation(args.relation, model.tokenizer, min_pairs=args.min_pairs)
    try:
        hs = static_scores(model, pairs, k=args.k, suppression=args.suppression)
    except ValueError as exc:  # a bad k, or no pairs left at all
        raise CLIError(str(exc)) from exc
    if args.json:
        return json.dumps({"model": args.model, "relation": args.relation, "method": hs.method, "k": hs.k,
                           "pairs_used": hs.meta["pairs_used"], "pairs_total": hs.meta["pairs_total"],
                           "layout": "scores[layer][head]", "scores": hs.to_dict()["scores"]}, indent=2)
    kind = "suppression" if args.suppression else "static"
    lines = [f"MAPS {kind} scores, {args.relation}, k={hs.k}, {hs.meta['pairs_used']}/{hs.meta['pairs_total']} "
             f"pairs, {args.model}",
             "rows: heads, columns: layers (as in the heatmaps: layer on x, head 0 at the top)",
             "head\\layer " + " ".join(f"{layer:>5}" for layer in range(hs.n_layers))]
    for head, col in enumerate(hs.scores.T.tolist()):
        lines.append(f"{head:>10} " + " ".join(f"{v:5.2f}" for v in col))
    return "\n".join(lines)


def _missing_top(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    top = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        top = p
    return top


def cli_report(args: argparse.Namespace) -> str:
    from .rehearsal import parse_plan
    from .report import SKIPPABLE, run_report

    try:
        plan = parse_plan(args.plan)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    bad = sorted(set(args.skip) - set(SKIPPABLE))
    if bad:
        raise CLIError(f"cannot skip {', '.join(bad)}: skippable are {', '.join(SKIPPABLE)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} is a file; pass a directory (it is created if missing)")
    created = _missing_top(out.resolve())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create --out {args.out!r}: {exc.strerror or exc}") from exc
    try:
        run_report(args.model, out, all_relations=args.all_relations, progress=not args.quiet, plan=plan,
                   skip=args.skip)
    except BaseException:
        if created is not None:  # a failed run leaves no directory behind that it made itself
            shutil.rmtree(created, ignore_errors=True)
        raise
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m circuitlib", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{relations,scores,report,rehearse}")

    p = sub.add_parser("relations", help="pairs kept per MAPS relation for a model's tokenizer",
                       description="Pairs kept per MAPS relation for a model's tokenizer (no weights loaded).")
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--min-pairs", type=int, default=30, metavar="N",
                   help="a relation is valid with at least N single-token pairs (MAPS: 30)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.set_defaults(func=cli_relations)

    p = sub.add_parser("scores", help="MAPS static (or suppression) scores of every head for one relation",
                       description="MAPS static (or suppression) scores of every head for one relation. "
                                   "The table has one row per head and one column per layer.")
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--relation", required=True, help="a relation name (the relations command lists them)")
    p.add_argument("--k", type=int, default=None, help="top-k (default: 1 for copying relations, else 10)")
    p.add_argument("--min-pairs", type=int, default=30, metavar="N",
                   help="refuse a relation with fewer than N single-token pairs (MAPS: 30)")
    p.add_argument("--suppression", action="store_true", help="suppression scores (top-k of -m_s)")
    p.add_argument("--json", action="store_true",
                   help="print JSON only (scores[layer][head], k, pairs used)")
    p.set_defaults(func=cli_scores)

    p = sub.add_parser("report", help="run the whole pipeline and write a report directory",
                       description="Run the whole pipeline and write summary.json, report.md and PNGs.")
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--out", default="report", help="output directory (created; removed again if the run fails)")
    p.add_argument("--all-relations", action="store_true", help="score every valid relation, not only the figure's two")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .rehearsal import add_arguments, add_report_options

    add_report_options(p)
    p.set_defaults(func=cli_report)

    p = sub.add_parser("rehearse", help="the report on a random-weight model in a hub-format cache, offline",
                       description="Write a random-weight MODEL in its hub cache format (real config.json, "
                                   "GPT-2's tokenizer) to a temporary Hugging Face cache and run the whole report "
                                   "on it offline, by name, in a fresh process; print wall time per section and "
                                   "peak memory. The scores of random weights mean nothing; the times do.")
    add_arguments(p, model_option=True)
    p.set_defaults(func=cli_rehearse)
    return parser


def cli_rehearse(args: argparse.Namespace) -> str:
    from .rehearsal import RehearsalError, run_args

    try:
        return run_args(args)
    except (RehearsalError, ValueError) as exc:
        raise CLIError(str(exc)) from exc


def _cli_message(exc: Exception) -> str:
    # The library's advice names its keyword argument; on the command line it is an option.
    return str(exc).replace("pass min_pairs=... to lower", "pass --min-pairs N to lower")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import ModelUnavailableError
    from .tasks import RelationError

    try:
        # Anything the libraries print while working (TransformerLens, report progress) goes to
        # stderr: stdout carries the result only (pure JSON with --json).
        with contextlib.redirect_stdout(sys.stderr):
            text = args.func(args)
    except (ModelUnavailableError, RelationError, CLIError) as exc:
        print(f"error: {_cli_message(exc)}", file=sys.stderr)
        return 2
    if not text:
        return 0
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
