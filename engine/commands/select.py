"""`mashup select`: choose and weight donors from scores.parquet; writes selection.json."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from engine.selection import METRICS, STRATEGIES
    from engine.weighting import WEIGHTINGS

    p = sub.add_parser("select", help="pick and weight donors from the scores", description=__doc__)
    p.add_argument("--config", help="YAML file (engine.selection:SelectConfig); flags override it")
    p.add_argument("--scores", help="scores.parquet, or the folder holding it")
    p.add_argument("--pool", help="the pool id `mashup score` printed (or a unique prefix): which donors to rank, "
                                   "when the store holds several scoring scopes")
    p.add_argument("--sample", help="the sample id to rank on, when the store holds several samples")
    p.add_argument("--k", type=int, help="number of donors (not needed with --strategy all)")
    p.add_argument("--strategy", choices=STRATEGIES, help="top-k (default), random-k, worst-k or all")
    p.add_argument("--metric", choices=METRICS,
                   help="what ranks the donors: loss (default, lower first) or token_accuracy (higher first, the "
                        "Mashup authors' default); ties broken by loss")
    p.add_argument("--below-base", dest="below_base", action=argparse.BooleanOptionalAction, default=None,
                   help="only donors better than the base model by the ranking metric")
    p.add_argument("--seed", type=int, help="seed for random-k (default 0)")
    p.add_argument("--weighting", choices=WEIGHTINGS, help="uniform (default), mwa, mwa-steps or softmax")
    p.add_argument("--penalty", type=float, help="p for mwa (w ∝ loss^-p) and mwa-steps (w ∝ step^p); default 1")
    p.add_argument("--temperature", type=float, help="T for softmax (w ∝ exp(-loss/T)); default 1")
    p.add_argument("--out", help="selection.json to write")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.core.config import build_config
    from engine.core.errors import ConfigError
    from engine.core.paths import check_paths
    from engine.selection import SelectConfig, select_with_config

    keys = ("scores", "pool", "sample", "k", "strategy", "metric", "below_base", "seed", "weighting", "penalty", "temperature", "out")
    config = build_config(SelectConfig, args.config, {k: getattr(args, k) for k in keys})
    check_paths(config, {"scores": "scores"})
    if config.out is None:
        raise ConfigError("out: required (the selection.json to write)")
    selection = select_with_config(config)
    base = "n/a" if selection.base_loss is None else f"{selection.base_loss:.4f}"
    print(f"selected {selection.k} donors ({selection.strategy} by {selection.metric}, {selection.weighting}; "
          f"base loss {base}) -> {config.out}")
    for entry in selection.donors:
        acc = "n/a" if entry.token_accuracy is None else f"{entry.token_accuracy:.4f}"
        print(f"  {entry.donor}  loss {entry.loss:.4f}  token accuracy {acc}  weight {entry.weight:.4f}")
    return 0
