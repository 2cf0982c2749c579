"""Hugging Face Hub access through `huggingface_hub`: adapter files only, into the normal HF cache.

`HF_HUB_OFFLINE=1` makes every call read the local cache only, which is how the tests exercise this code.
"""
from __future__ import annotations

from dataclasses import dataclass

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "*.bin"]
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, uri: str, scheme: str = "hf://") -> "HubRef":
        body = uri[len(scheme):]
        repo, _, rev = body.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"expected {scheme}owner/name[@revision], got {uri!r}")
        return cls(repo, rev or None)


def fetch(uri: str, allow_patterns: list[str] | None = None) -> str:
    """Download (or find in cache) a repo snapshot and return its local folder. `*.bin` is fetched only to report it."""
    from huggingface_hub import snapshot_download

    ref = HubRef.parse(uri)
    return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow_patterns or ADAPTER_FILES)


def resolve_base(base: str) -> str:
    """A local folder stays as it is; `hf://org/name[@rev]` becomes its cached snapshot folder."""
    return fetch(base, MODEL_FILES) if base.startswith("hf://") else base


def collection_items(uri: str) -> list[str]:
    """The model repos of a Hub collection, as `hf://` URIs (datasets, spaces and papers are skipped)."""
    from huggingface_hub import get_collection

    from engine.errors import ConfigError

    slug = uri[len("hf-collection://"):]
    try:
        items = get_collection(slug).items
    except Exception as exc:  # noqa: BLE001 - offline mode, network, 404: all one clear line
        raise ConfigError(f"donors: could not list {uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return [f"hf://{item.item_id}" for item in items if item.item_type == "model"]
