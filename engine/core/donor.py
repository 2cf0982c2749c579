"""A donor as every stage sees it, from the catalog to the merge: id, where its files are, the root they must
stay inside, free metadata, the pinned Hub commit, and an error the catalog already knows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DonorEntry:
    donor: str
    path: str  # a local folder, or an hf:// URI fetched where the donor is scored
    root: str | None = None  # files must resolve inside this folder (None for Hub snapshots)
    meta: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    error: str | None = None  # set when the catalog already knows the donor is unusable

    @property
    def is_hub(self) -> bool:
        return self.path.startswith("hf://")


def inside(root: str | Path, path: str | Path) -> bool:
    """True when `path`, with symlinks resolved, lies inside `root`."""
    root_r = Path(root).resolve()
    return Path(path).resolve().is_relative_to(root_r)
