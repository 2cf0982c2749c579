"""sha256 of donor weight files, run as a helper process beside the merge (merge_info.json records them).

Hashing a thousand donors is about as much work as reading them. In a thread it fights the merge for the GIL
and slowed it down; in its own process it uses another core. It imports only `engine.core.adapter` (standard library
and our errors), so it starts in milliseconds. Protocol: a JSON list of paths on stdin, a JSON list of hex
digests on stdout.
"""
from __future__ import annotations

import json
import sys

from engine.core.adapter import sha256_file


def main() -> None:
    json.dump([sha256_file(path) for path in json.load(sys.stdin)], sys.stdout)


if __name__ == "__main__":
    main()
