"""Benchmarks rewrite their own README table between markers, so the README never drifts from the JSON."""
from __future__ import annotations

from pathlib import Path

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
