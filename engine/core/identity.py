"""What every cached result is keyed by: the content that produced it (docs/contracts.md, "Cached results").

- A score row is reused only while the donor's files, the base, the tokenized sample and the template are the
  ones it was computed from: the sample id is a hash of the base's fingerprint and every example's token ids
  (the chat template is applied before tokenizing, so it is inside the token ids), and the row records the
  donor's content fingerprint (`engine.core.adapter.fingerprint`) and a stat signature of its files.
- A merge is redone when its key changes: the method, every merge option, and each donor's name, weight and
  content fingerprint.
- A finetune run is retrained when the fingerprint of the adapter it started from, or its config, changes.

Fingerprints stay cheap for thousands of donors: the driver only stats donor files (the scoring nodes hash them),
and a local base is fingerprinted from its file names, sizes and mtimes plus the bytes of its small files.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

SMALL_FILE = 1 << 20  # config, tokenizer and template files are hashed by content


def base_fingerprint(base: str) -> tuple[str, str]:
    """(the base as actors should load it, its fingerprint).

    `hf://org/name[@branch]` is pinned to the commit it resolves to now, so every actor loads the same files and a
    moved branch gives a new fingerprint. A local folder is fingerprinted from every file's relative name, size and
    mtime (a weight file rewritten in place changes them) and the bytes of every file under 1 MiB.
    """
    if base.startswith("hf://"):
        from engine.core.hub import HubRef, resolve_base

        folder = Path(resolve_base(base, ["config.json"]))
        commit = folder.name  # the cache names a snapshot after its commit
        return HubRef(HubRef.parse(base).repo_id, commit).uri, f"hf:{commit}"
    root = Path(base)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if st.st_size <= SMALL_FILE:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return base, f"dir:{digest.hexdigest()[:32]}"


def key_of(payload: Any) -> str:
    """A stable hash of a JSON-able value: the key a cached merge or run is compared by."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
