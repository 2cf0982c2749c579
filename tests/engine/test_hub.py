import os
from pathlib import Path

from engine.catalog import build_catalog
from engine.hub import fetch, resolve_base
from engine.testing import publish_to_hf_cache


def test_offline_fetch_reads_the_hf_cache(pool_dir):
    cache = Path(os.environ["HF_HUB_CACHE"])
    publish_to_hf_cache(cache, "acme/donor-a", pool_dir / "qv" / "donor1", revision="v1")
    folder = Path(fetch("hf://acme/donor-a@v1"))
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        pool_dir / "qv" / "donor1" / "adapter_model.safetensors"
    ).read_bytes()
    [entry] = build_catalog(["hf://acme/donor-a@v1"])
    assert entry.revision == "v1" and entry.is_hub


def test_hub_base_resolves_to_snapshot(base_dir):
    cache = Path(os.environ["HF_HUB_CACHE"])
    snap = publish_to_hf_cache(cache, "acme/tiny-base", base_dir)
    assert Path(resolve_base("hf://acme/tiny-base")) == snap
    assert resolve_base(str(base_dir)) == str(base_dir)
