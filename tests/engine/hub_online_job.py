"""Run by test_hub.py in a subprocess (huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once,
at import): the real client against the loopback stand-in Hub (tests/engine/hub_standin.py), then offline.

`online POOL CACHE`: a collection of 8 donors plus a repo the Hub does not have, pinned at catalog time; downloads
with a bound of 1 and of 3 in flight (into two caches); a branch that moves after pinning. `offline CACHE`: the
same catalog and downloads from the cache alone. Each prints `RESULT {json}`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

N = 8


def online(pool: Path, cache: Path) -> dict:
    from hub_standin import StandInHub

    hub = StandInHub(file_delay_s=0.25)
    with hub:
        donors = sorted(p for p in pool.glob("*/*") if p.is_dir())
        for i in range(N):
            hub.publish(f"acme/d{i}", donors[i % len(donors)])
        hub.collections["acme/pool"] = [{"_id": str(i), "id": f"acme/d{i}", "type": "model", "position": i}
                                        for i in range(N)]
        hub.collections["acme/pool"].append({"_id": "x", "id": "acme/gone", "type": "model", "position": N})
        os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(cache / "serial"))
        from huggingface_hub import constants

        from engine.scoring.catalog import build_catalog
        from engine.core.hub import fetch, fetch_all

        catalog = build_catalog(["hf-collection://acme/pool"], hub_concurrency=4)
        pinned = {e.donor: (e.path, e.revision, e.error) for e in catalog}
        uris = [e.path for e in catalog if not e.error]
        seconds = {}
        for bound, sub in ((1, "serial"), (3, "parallel")):
            constants.HF_HUB_CACHE = str(cache / sub)  # a fresh cache per run, so both really download
            hub.max_repos_in_flight = 0
            t0 = time.perf_counter()
            got = fetch_all(uris, bound)
            seconds[bound] = round(time.perf_counter() - t0, 2)
            assert all(isinstance(v, str) for v in got.values()), got
            pinned[f"max_in_flight_{bound}"] = hub.max_repos_in_flight
        old_path = catalog[0].path
        hub.publish("acme/d0", donors[-1])  # main moves after the catalog pinned it
        moved_files = Path(fetch(old_path)) / "adapter_model.safetensors"
        repinned = build_catalog(["hf://acme/d0"])[0]
    return {"pinned": pinned, "seconds": seconds, "still_pinned_bytes": moved_files.read_bytes().hex()[:64],
            "repinned": [repinned.path, repinned.revision], "requests": len(hub.requests),
            "head_of_original": (donors[0] / "adapter_model.safetensors").read_bytes().hex()[:64]}


def offline(cache: Path) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache / "serial"))  # holds the refs the catalog pinned
    from engine.scoring.catalog import build_catalog
    from engine.core.hub import fetch_all, hub_error

    catalog = build_catalog([f"hf://acme/d{i}" for i in range(N)] + ["hf://acme/never-downloaded"])
    got = fetch_all([e.path for e in catalog], 4)
    return {"entries": [[e.donor, e.path, e.revision] for e in catalog],
            "fetched": {uri: (v if isinstance(v, str) else hub_error(uri, v)) for uri, v in got.items()}}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    mode = sys.argv[1]
    result = online(Path(sys.argv[2]), Path(sys.argv[3])) if mode == "online" else offline(Path(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
