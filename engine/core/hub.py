"""Hugging Face Hub access through `huggingface_hub`: adapter files only, into the normal HF cache (HF_HUB_CACHE).

Every call goes through huggingface_hub's own functions (`get_collection`, `HfApi.resolve_revision`,
`snapshot_download`), so HF_ENDPOINT, tokens, file locks on a shared cache and `HF_HUB_OFFLINE=1` (cache only)
behave as they do everywhere else. Revisions are pinned to a commit once, on the driver (`resolve_commits`), so
that every node fetching a donor later gets the same files even if its branch moves during the job.
"""
from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]  # never a pickle: nothing may read one
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.jinja"]
COMMIT = re.compile(r"[0-9a-f]{40}")


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

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def offline() -> bool:
    """True under HF_HUB_OFFLINE=1, as huggingface_hub itself reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch(uri: str, allow_patterns: list[str] | None = None) -> str:
    """Download (or find in cache) a repo snapshot and return its local folder: config and safetensors files only."""
    from huggingface_hub import snapshot_download

    ref = HubRef.parse(uri)
    return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow_patterns or ADAPTER_FILES)


def snapshot_commit(folder: str | Path) -> str:
    """The commit a snapshot folder holds: the cache layout names it `snapshots/<commit>`."""
    return Path(folder).name


def hub_error(uri: str, exc: BaseException) -> str:
    """One line naming the donor's URI and what to do; a cache miss in offline mode names the cache and the host."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if offline() and isinstance(exc, (LocalEntryNotFoundError, FileNotFoundError)):
        return (f"{uri} is not in the Hub cache {constants.HF_HUB_CACHE} on host {socket.gethostname()} and "
                "HF_HUB_OFFLINE=1: download it into that cache first (hf download), or unset HF_HUB_OFFLINE")
    if isinstance(exc, RevisionNotFoundError):
        return f"{uri}: the Hub has no such revision"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{uri}: the Hub has no such model repo (or it is private or gated and no token gives access)"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{uri}: {type(exc).__name__}: {first}"


def fetch_all(uris: Sequence[str], concurrency: int) -> dict[str, str | BaseException]:
    """Snapshots of many repos, at most `concurrency` downloads in flight: adapters are small, so per-repo round
    trips, not bandwidth, dominate, and a bound keeps a thousand donors from opening a thousand connections."""
    unique = list(dict.fromkeys(uris))
    return dict(zip(unique, _bounded_map(fetch, unique, concurrency, "hub-fetch")))


def resolve_commits(refs: Sequence[HubRef], concurrency: int) -> list[str | BaseException]:
    """Each ref's commit hash (`HfApi.resolve_revision`: the Hub when online, the cache's refs/ when offline),
    resolved with at most `concurrency` requests in flight. A ref that cannot be resolved yields its exception."""
    from huggingface_hub import HfApi

    api = HfApi()

    local = offline()  # resolve from refs/ without one "could not reach the Hub" warning per donor

    def one(ref: HubRef) -> str:
        return api.resolve_revision(ref.repo_id, revision=ref.revision, local_files_only=local).resolved

    return _bounded_map(one, refs, concurrency, "hub-pin")


def _bounded_map(fn, items: Sequence, concurrency: int, name: str) -> list:
    """fn over items with at most `concurrency` threads; each item yields its result or the exception it raised."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item) for item in items]
    return [f.exception() or f.result() for f in futures]


def unresolvable_here(exc: BaseException) -> bool:
    """The Hub was unreachable and this machine's cache has no entry: another node's cache may still have one."""
    from huggingface_hub.errors import RevisionResolutionError

    return isinstance(exc, RevisionResolutionError)


def resolve_base(base: str, allow_patterns: list[str] | None = None) -> str:
    """A local folder stays as it is; `hf://org/name[@rev]` becomes its cached snapshot folder."""
    return fetch(base, allow_patterns or MODEL_FILES) if base.startswith("hf://") else base


def collection_items(uri: str) -> list[str]:
    """The model repos of a Hub collection, as `hf://` URIs (datasets, spaces and papers are skipped).

    huggingface_hub's `get_collection` makes one request and returns every item the API sends (it has no paging
    of its own in the version we pin), so a collection of thousands of adapters is one call.
    """
    from huggingface_hub import get_collection

    from engine.core.errors import ConfigError

    slug = uri[len("hf-collection://"):]
    try:
        items = get_collection(slug).items
    except Exception as exc:  # noqa: BLE001 - offline mode, network, 404: all one clear line
        raise ConfigError(f"donors: could not list {uri}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return [f"hf://{item.item_id}" for item in items if item.item_type == "model"]
