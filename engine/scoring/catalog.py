"""Donor sources → donor entries: directories, JSONL manifests, `hf://` repos and `hf-collection://` collections.

The catalog only names donors and checks where they live (no file escapes its root, ids are unique), and pins
every Hub donor to a commit. Whether a donor fits the base is decided later, next to the files, by
`engine.core.validate` (on the node that scores it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine.core.adapter import ADAPTER_FILES
from engine.core.donor import DonorEntry, inside
from engine.core.errors import ConfigError
from engine.core.scores import BASE_ROW

log = logging.getLogger("mashup.catalog")
HUB_CONCURRENCY = 8


def from_directory(root: Path) -> list[DonorEntry]:
    """Every folder holding adapter files; a symlinked donor folder that leaves `root` is reported, not followed."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f in filenames for f in ADAPTER_FILES):
            rel = Path(dirpath).relative_to(root).as_posix()
            donor = rel if rel != "." else root.name
            entry = DonorEntry(donor, os.path.abspath(dirpath), os.path.abspath(root))
            if not inside(root, dirpath):
                entry.error = f"path escapes the pool root {root}"
            entries.append(entry)
        for name in dirnames:  # os.walk does not follow symlinks: report the ones that would leave the root
            link = Path(dirpath) / name
            if link.is_symlink() and not inside(root, link) and any((link / f).exists() for f in ADAPTER_FILES):
                entries.append(DonorEntry(link.relative_to(root).as_posix(), os.path.abspath(link), os.path.abspath(root),
                                          error=f"folder is a symlink to {link.resolve()}, outside the pool root {root}"))
    return entries


TRUSTED_ROOTS_ENV = "MASHUP_TRUSTED_ROOTS"


def trusted_roots(configured: Iterable[str | Path] = ()) -> list[Path]:
    """Folders a manifest may point into besides its own: the config's `trusted_roots` plus the
    MASHUP_TRUSTED_ROOTS environment variable (os.pathsep-separated), as absolute paths."""
    env = [p for p in os.environ.get(TRUSTED_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    roots = []
    for raw in [*configured, *env]:
        p = Path(raw).expanduser()
        if not p.is_absolute():
            raise ConfigError(f"trusted_roots: {str(raw)!r} is not an absolute path")
        roots.append(p)
    return roots


def from_manifest(manifest: Path, trusted: Iterable[Path] = ()) -> list[DonorEntry]:
    """Rows of a JSONL manifest. A local path must resolve inside the manifest's folder, or inside one of the
    `trusted` roots (adapters on shared storage): a manifest can then never make the scorer read files elsewhere."""
    from engine.core.data import iter_jsonl

    root = manifest.parent.absolute()
    trusted = list(trusted)
    entries = []
    for where, row in iter_jsonl(manifest, ConfigError):
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("path"), str):
            raise ConfigError(f"{where}: each line needs string fields 'id' and 'path'")
        meta = {k: v for k, v in row.items() if k not in ("id", "path")}
        raw = row["path"]
        if raw.startswith("hf://"):
            entries.append(DonorEntry(row["id"], raw, None, meta, revision=_revision(raw)))
            continue
        path = (root / raw) if not os.path.isabs(raw) else Path(raw)
        holder = root if inside(root, path) else next((t for t in trusted if inside(t, path)), None)
        entry = DonorEntry(row["id"], str(path), str(holder or root), meta)
        if holder is None:
            entry.error = (f"manifest path {raw!r} escapes the manifest folder {root}; to allow it, name a folder "
                           f"that holds it in score.trusted_roots or {TRUSTED_ROOTS_ENV} (os.pathsep-separated)")
        entries.append(entry)
    return entries


def _revision(uri: str) -> str | None:
    return uri.partition("@")[2] or None


def from_source(source: str, trusted: Iterable[Path] = ()) -> list[DonorEntry]:
    """One user-given source string → its donors (`trusted`: extra roots a manifest may point into)."""
    if source.startswith("hf-collection://"):
        from engine.core.hub import collection_items

        return [DonorEntry(uri[len("hf://"):], uri, revision=_revision(uri)) for uri in collection_items(source)]
    if source.startswith("hf://"):
        return [DonorEntry(source[len("hf://"):], source, revision=_revision(source))]
    p = Path(source)
    if p.is_dir():
        return from_directory(p)
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        return from_manifest(p, trusted)
    raise ConfigError(f"donors: {source!r} is not a folder, a .jsonl manifest, hf://… or hf-collection://…")


def build_catalog(sources: Iterable[str], hub_concurrency: int = HUB_CONCURRENCY,
                  trusted: Iterable[str | Path] = ()) -> list[DonorEntry]:
    """All donors of all sources, Hub donors pinned to a commit; a repeated id is kept once and each repeat is
    marked failed, never dropped silently. `trusted`: the score config's trusted_roots (the env var is added)."""
    roots = trusted_roots(trusted)
    seen: dict[str, DonorEntry] = {}
    out: list[DonorEntry] = []
    for source in sources:
        for entry in from_source(source, roots):
            if entry.donor == BASE_ROW:
                entry.error = f"the id '{BASE_ROW}' is reserved for the base model"
            if entry.donor in seen:
                first = seen[entry.donor]
                entry = DonorEntry(
                    f"{entry.donor}#dup{len(out)}", entry.path, entry.root, entry.meta, entry.revision,
                    error=f"duplicate donor id {entry.donor!r} (first seen at {first.path})",
                )
            else:
                seen[entry.donor] = entry
            out.append(entry)
    if not out:
        raise ConfigError(f"donors: no adapters found in {list(sources)}")
    pin_revisions(out, hub_concurrency)
    return out


def pin_revisions(entries: list[DonorEntry], concurrency: int = HUB_CONCURRENCY) -> None:
    """Rewrite each Hub donor's path to `hf://owner/name@<commit>`, so that every node fetches the same files, the
    scores record the commit scored and a later merge reads that commit, whatever its branch does meanwhile.

    A donor the Hub does not know (repo, revision, access) gets its error here. One that cannot be resolved on this
    machine (offline, or the Hub unreachable, and no ref in this machine's cache) stays unpinned: the node that
    scores it resolves the ref from its own cache and the row records the commit it used.
    """
    from engine.core.hub import HubRef, hub_error, resolve_commits, unresolvable_here

    todo = [(e, HubRef.parse(e.path)) for e in entries if e.is_hub and e.error is None]
    unpinned = 0
    for (entry, ref), result in zip(todo, resolve_commits([ref for _, ref in todo], concurrency)):
        if isinstance(result, str):
            if result != ref.revision:
                entry.meta = {**entry.meta, "requested_revision": ref.revision or "main"}
            entry.path, entry.revision = HubRef(ref.repo_id, result).uri, result
        elif unresolvable_here(result):
            unpinned += 1
        else:
            entry.error = hub_error(ref.uri, result)
    if unpinned:
        log.warning("%d Hub donors could not be pinned here (offline or Hub unreachable, not in this cache); "
                    "each is pinned by the node that scores it", unpinned)


def moved_revisions(entries: Iterable[DonorEntry], rows, sample_id: str) -> dict[str, tuple[str, str]]:
    """Donors whose `ok` row for this sample holds another commit than the one pinned now: {donor: (scored, now)}.

    A rerun after a branch moved rescores these (their new rows replace the old ones) rather than mixing
    commits: a score must describe the files that a later merge reads. `rows` is the store's frame.
    """
    from engine.core.hub import COMMIT

    ok = rows[(rows.status == "ok") & (rows.sample_id == sample_id)]
    scored = dict(zip(ok.donor, ok.revision))
    moved = {}
    for e in entries:
        old = scored.get(e.donor)
        if e.is_hub and e.revision and COMMIT.fullmatch(e.revision) and isinstance(old, str) and old != e.revision:
            moved[e.donor] = (old, e.revision)
    if moved:
        log.warning("%d Hub donors moved to another commit since they were scored; rescoring them: %s", len(moved),
                    ", ".join(f"{d} ({a[:8]} -> {b[:8]})" for d, (a, b) in sorted(moved.items())[:10]))
    return moved


def stale_donors(entries: Iterable[DonorEntry], rows, sample_id: str) -> set[str]:
    """Donors whose `ok` row for this sample no longer describes the files the catalog points at: rescore them.

    A row stays current only when (1) it was scored from the same path, (2) a Hub donor's pinned commit is the
    same, and (3) a local donor's stat signature (resolved path, sizes, mtimes, inodes; a stat, no read) equals
    the one the scoring node recorded next to the content fingerprint it hashed. A donor retrained in place, or
    a manifest id pointed at another folder, is therefore rescored, never matched with its old score. A local
    donor this machine cannot see (a node-local path) is rescored too. `rows` is the store's frame.
    """
    from engine.core.adapter import stat_signature

    stale = set(moved_revisions(entries, rows, sample_id))
    ok = rows[(rows.status == "ok") & (rows.sample_id == sample_id)]
    recorded = {d: (p, s) for d, p, s in zip(ok.donor, ok.path, ok.donor_stat)}
    changed = []
    for e in entries:
        if e.donor not in recorded or e.donor in stale:
            continue
        path, stat = recorded[e.donor]
        if e.is_hub and isinstance(path, str) and path.partition("@")[0] == e.path.partition("@")[0]:
            continue  # the same repo, and a commit is a content address: moved_revisions compares it
        if e.is_hub:  # the id named a local donor, or another repo, when it was scored: its row is not this donor's
            stale.add(e.donor)
            changed.append(e.donor)
            continue
        if path != e.path or not isinstance(stat, str) or stat != stat_signature(e.path):
            stale.add(e.donor)
            changed.append(e.donor)
    if changed:
        log.warning("%d donors changed since they were scored (path or files); rescoring them: %s", len(changed),
                    ", ".join(sorted(changed)[:10]))
    return stale
