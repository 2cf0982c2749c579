"""`mashup freeze`: pin hf:// ids and hf-collection:// collections to commits in a JSONL manifest."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("freeze", help="pin Hub donors to commits in a manifest", description=__doc__)
    p.add_argument("sources", nargs="+", help="hf://owner/name[@rev] ids and hf-collection://owner/slug URIs")
    p.add_argument("--out", required=True, help="manifest.jsonl to write (one row per donor: id, pinned path)")
    p.add_argument("--hub-concurrency", dest="hub_concurrency", type=int, default=8, help="revision look-ups in flight")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.freeze import freeze

    entries = freeze(args.sources, args.out, args.hub_concurrency)
    print(f"froze {len(entries)} donors -> {args.out}")
    return 0
