"""sha256 of donor weight files, run as a helper process beside the merge (merge_info.json records them).

Hashing a thousand donors is about as much work as reading them. In a thread it fights the merge for the GIL
and slowed it down; in its own process it uses another core. Standard library only, so it starts in milliseconds.
Protocol: a JSON list of paths on stdin, a JSON list of hex digests on stdout.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hashes the page-cache pages in place (mmap) rather than copying them into a buffer first."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def main() -> None:
    json.dump([sha256_file(path) for path in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
