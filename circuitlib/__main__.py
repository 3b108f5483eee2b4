"""Command line: ``python -m circuitlib {relations,scores,report} ...``.

- ``relations --model MODEL [--json]``: per MAPS relation, pairs kept / total and validity for the
  model's tokenizer (GPT-2 family names use the offline GPT-2 tokenizer; no weights are loaded).
- ``scores --model MODEL --relation NAME [--k K] [--suppression] [--json]``: MAPS static scores.
- ``report --model MODEL --out DIR``: the whole pipeline; writes ``summary.json``, ``report.md``, PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli_relations(args: argparse.Namespace) -> int:
    from .models import load_tokenizer
    from .tasks import relation_table

    rows = relation_table(load_tokenizer(args.model), min_pairs=args.min_pairs)
    if args.json:
        print(json.dumps({"model": args.model, "min_pairs": args.min_pairs, "relations": rows}, indent=2))
        return 0
    width = max(len(r["relation"]) for r in rows)
    print(f"{'relation':<{width}}  kept/total   k  valid (>= {args.min_pairs} pairs) for {args.model}")
    for r in rows:
        print(f"{r['relation']:<{width}}  {r['kept']:>4}/{r['total']:<5}  {r['k']:>2}  {'yes' if r['valid'] else 'no'}")
    return 0


def cli_scores(args: argparse.Namespace) -> int:
    from .models import load_model
    from .scoring import static_scores

    model = load_model(args.model)
    try:
        hs = static_scores(model, args.relation, k=args.k, suppression=args.suppression)
    except ValueError as exc:  # bad k, empty relation (RelationError is handled by main)
        if type(exc).__name__ == "RelationError":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": args.model, "relation": args.relation, "method": hs.method, "k": hs.k,
                          "pairs_used": hs.meta["pairs_used"], "pairs_total": hs.meta["pairs_total"],
                          "scores": hs.to_dict()["scores"]}, indent=2))
        return 0
    kind = "suppression" if args.suppression else "static"
    print(f"MAPS {kind} scores, {args.relation}, k={hs.k}, {hs.meta['pairs_used']}/{hs.meta['pairs_total']} "
          f"pairs, {args.model} (rows: layers, columns: heads)")
    print("layer " + " ".join(f"{h:>5}" for h in range(hs.n_heads)))
    for layer, row in enumerate(hs.scores.tolist()):
        print(f"{layer:>5} " + " ".join(f"{v:5.2f}" for v in row))
    return 0


def cli_report(args: argparse.Namespace) -> int:
    from .report import run_report

    run_report(args.model, args.out, all_relations=args.all_relations, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m circuitlib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("relations", help="pairs kept per MAPS relation for a model's tokenizer")
    p.add_argument("--model", default="toy", help="'toy', a TransformerLens name, or a local HF directory")
    p.add_argument("--min-pairs", type=int, default=30, help="validity threshold (MAPS: 30)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cli_relations)

    p = sub.add_parser("scores", help="MAPS static (or suppression) scores of every head for one relation")
    p.add_argument("--model", default="toy", help="'toy', a TransformerLens name, or a local HF directory")
    p.add_argument("--relation", required=True, help="a relation name (see the relations command)")
    p.add_argument("--k", type=int, default=None, help="top-k (default: 1 for copying relations, else 10)")
    p.add_argument("--suppression", action="store_true", help="suppression scores (top-k of -m_s)")
    p.add_argument("--json", action="store_true", help="print JSON (matrix, k, pairs used)")
    p.set_defaults(func=cli_scores)

    p = sub.add_parser("report", help="run the whole pipeline and write a report directory")
    p.add_argument("--model", default="toy", help="'toy', a TransformerLens name, or a local HF directory")
    p.add_argument("--out", default="report", help="output directory (created)")
    p.add_argument("--all-relations", action="store_true", help="score every valid relation, not only the figure's two")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cli_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import ModelUnavailableError
    from .tasks import RelationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelUnavailableError, RelationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
