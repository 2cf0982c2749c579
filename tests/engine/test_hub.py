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


def test_collection_offline_is_one_clear_error():
    import pytest

    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="could not list hf-collection://acme/loras"):
        build_catalog(["hf-collection://acme/loras-0123"])


def test_collection_lists_model_items_through_the_real_client(tmp_path):
    """The Hub API is unreachable here, so a loopback server stands in for it (a named stand-in, not a mock of our
    code): the real `huggingface_hub.get_collection` runs against it in a subprocess with HF_ENDPOINT set."""
    import json
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    collection = {
        "slug": "acme/loras-0123", "title": "loras", "owner": {"name": "acme"}, "lastUpdated": "2026-11-01T00:00:00.000Z",
        "position": 0, "private": False, "theme": "blue", "upvotes": 0,
        "items": [
            {"_id": "1", "id": "acme/donor-a", "type": "model", "position": 0},
            {"_id": "2", "id": "acme/some-data", "type": "dataset", "position": 1},
            {"_id": "3", "id": "acme/donor-b", "type": "model", "position": 2},
        ],
    }
    seen = []

    class StandInHub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.path)
            body = json.dumps(collection).encode() if self.path == "/api/collections/acme/loras-0123" else b"{}"
            self.send_response(200 if body != b"{}" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
        code = ("import json; from engine.catalog import build_catalog; "
                "print(json.dumps([(e.donor, e.path) for e in build_catalog(['hf-collection://acme/loras-0123'])]))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [["acme/donor-a", "hf://acme/donor-a"],
                                                                ["acme/donor-b", "hf://acme/donor-b"]]
    assert "/api/collections/acme/loras-0123" in seen
