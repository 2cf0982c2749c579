"""`mashup freeze`: Hub donor sources → a pinned JSONL manifest, one row per donor with its resolved commit.

A collection or a branch moves; a study must not. Freezing resolves every `hf://` id and every model of an
`hf-collection://` once (engine.scoring.catalog.pin_revisions, the same resolution scoring uses) and writes rows that
`mashup score` reads back as `hf://owner/name@<commit>`, so a rerun months later scores the same files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from engine.core.atomic import atomic_write_text
from engine.scoring.catalog import HUB_CONCURRENCY, from_source, pin_revisions
from engine.core.donor import DonorEntry
from engine.core.errors import ConfigError
from engine.core.hub import COMMIT


def freeze(sources: Sequence[str], out: str | Path, concurrency: int = HUB_CONCURRENCY) -> list[DonorEntry]:
    """Pin every donor of `sources` (hf:// ids, hf-collection:// URIs) and write the manifest to `out`.

    Nothing is written unless every donor resolved to a commit: a half-pinned manifest would silently float."""
    entries: list[DonorEntry] = []
    for source in sources:
        if not source.startswith(("hf://", "hf-collection://")):
            raise ConfigError(f"freeze: {source!r} is not hf://… or hf-collection://… (local donors are pinned by "
                              "content when scored; list them in a manifest)")
        entries.extend(from_source(source))
    if not entries:
        raise ConfigError(f"freeze: no donors in {list(sources)}")
    pin_revisions(entries, concurrency)
    ids = [e.donor for e in entries]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise ConfigError(f"freeze: donor ids repeat across the sources: {', '.join(dups[:5])}")
    bad = [e for e in entries if e.error or not (e.revision and COMMIT.fullmatch(e.revision))]
    if bad:
        first = bad[0]
        why = first.error or "could not be resolved to a commit here (offline, or the Hub unreachable)"
        raise ConfigError(f"freeze: {len(bad)} of {len(entries)} donors not pinned, e.g. {first.donor}: {why}")
    rows = [{"id": e.donor, "path": e.path, **e.meta} for e in entries]
    atomic_write_text(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
    return entries
