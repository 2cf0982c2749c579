from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bad_pool(world, pool_dir) -> tuple[Path, dict[str, str]]:
    """A folder of malformed donors, plus a manifest beside it whose path escapes its root."""
    from bench.world.tiny import build_tiny_llama, train_tokenizer
    from tests.helpers import write_bad_donors

    other = world / "other_base"
    build_tiny_llama(other, train_tokenizer(other), hidden_size=96, seed=3)
    root = world / "bad_pool"
    expect = write_bad_donors(pool_dir / "qv" / "donor1", root, other)
    return root, expect


@pytest.fixture(scope="session")
def escaping_manifest(world, pool_dir) -> Path:
    folder = world / "manifests"
    folder.mkdir(exist_ok=True)
    (folder / "inside").symlink_to(pool_dir / "qv" / "donor1", target_is_directory=True)
    rows = [
        {"id": "escape", "path": "../pool/qv/donor3"},
        {"id": "symlinked", "path": "inside"},
        {"id": "absolute", "path": str(pool_dir / "qv" / "donor5")},
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
