"""`mashup checkpoints RUN_DIR`: a finetune run's checkpoints as donors, weighted by MWA (loss or step), optionally merged.

Writes RUN_DIR/checkpoints.jsonl (one row per checkpoint: id, path, step, train_loss) from the run's own log; with
--out, a selection.json for `mashup merge --selection`; with --merge DIR, the merged adapter itself.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from engine.checkpoints import DEFAULT_PENALTY, METRICS

    p = sub.add_parser("checkpoints", help="weight (and merge) a finetune run's checkpoints by MWA", description=__doc__)
    p.add_argument("run_dir", help="a `mashup finetune --save-every N` output folder, or its checkpoints.jsonl")
    p.add_argument("--metric", choices=METRICS, default="loss",
                   help="loss: w ∝ train_loss^-p (default); step: w ∝ step^p; uniform: the plain average")
    p.add_argument("--penalty", type=float, default=None, help=f"p (default {DEFAULT_PENALTY:g}; 0 = uniform)")
    p.add_argument("--steps", type=int, nargs="+", help="only these checkpoints (default: all)")
    p.add_argument("--out", help="selection.json to write (for `mashup merge --selection`)")
    p.add_argument("--merge", help="also merge the checkpoints into this adapter folder")
    p.add_argument("--method", default="linear", help="merge method for --merge (default linear)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.checkpoints import checkpoint_selection, merge_checkpoints

    if args.penalty is not None and args.penalty < 0:
        from engine.core.errors import ConfigError

        raise ConfigError(f"penalty: must be >= 0, got {args.penalty}")
    selection = checkpoint_selection(args.run_dir, args.metric, args.penalty, out=args.out, steps=args.steps)
    p = "" if selection.penalty is None else f", p={selection.penalty:g}"
    print(f"{selection.k} checkpoints ({selection.weighting}{p})" + (f" -> {args.out}" if args.out else ""))
    for d in selection.donors:
        print(f"  {d.donor}  train loss {d.loss:.4f}  weight {d.weight:.4f}")
    if args.merge:
        out = merge_checkpoints(args.run_dir, args.merge, args.metric, args.penalty, args.method, steps=args.steps)
        print(f"merged -> {out}")
    return 0
