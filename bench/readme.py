"""Benchmarks rewrite their own README table between markers, so the README never drifts from the JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from engine.core.atomic import atomic_write_text
from engine.core.errors import ConfigError


def replace_block(name: str, text: str, readme: Path = Path("README.md")) -> Path:
    """Replace what lies between `<!-- name:start -->` and `<!-- name:end -->`; both markers must exist."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        raise ConfigError(f"{readme}: markers {start} / {end} not found")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, f"{head}{start}\n{text.strip()}\n{end}{tail}")
    return readme


def add_output_options(ap, results: Path) -> None:
    """--results, --readme and --render-only, the same for every bench that writes a README block."""
    ap.add_argument("--results", type=Path, default=results)
    ap.add_argument("--readme", action="store_true", help="rewrite README's block from the results")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the README block from the JSON")


def rendered_only(args, block: str, render: Callable[[dict[str, Any]], str]) -> bool:
    """With --render-only, rewrite the block from the saved JSON and say so (the caller then stops)."""
    if args.render_only:
        replace_block(block, render(json.loads(args.results.read_text())))
    return bool(args.render_only)


def publish(res: dict[str, Any], args, block: str, render: Callable[[dict[str, Any]], str]) -> None:
    """Write the results JSON, the README block when asked, and print the table."""
    atomic_write_text(args.results, json.dumps(res, indent=1, default=float))
    if args.readme:
        replace_block(block, render(res))
    print(render(res))


def machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
