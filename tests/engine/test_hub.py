import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from engine.scoring.catalog import build_catalog
from engine.core.hub import fetch, resolve_base
from tests.helpers import publish_to_hf_cache


def test_offline_fetch_reads_the_hf_cache(pool_dir):
    cache = Path(os.environ["HF_HUB_CACHE"])
    publish_to_hf_cache(cache, "acme/donor-a", pool_dir / "qv" / "donor1", revision="v1")
    folder = Path(fetch("hf://acme/donor-a@v1"))
    assert (folder / "adapter_model.safetensors").read_bytes() == (
        pool_dir / "qv" / "donor1" / "adapter_model.safetensors"
    ).read_bytes()
    [entry] = build_catalog(["hf://acme/donor-a@v1"])  # pinned from the cache's refs/v1, offline
    commit = (cache / "models--acme--donor-a" / "refs" / "v1").read_text()
    assert entry.donor == "acme/donor-a@v1" and entry.revision == commit and entry.path == f"hf://acme/donor-a@{commit}"
    assert entry.meta == {"requested_revision": "v1"} and Path(fetch(entry.path)) == folder


def test_hub_base_resolves_to_snapshot(base_dir):
    cache = Path(os.environ["HF_HUB_CACHE"])
    snap = publish_to_hf_cache(cache, "acme/tiny-base", base_dir)
    assert Path(resolve_base("hf://acme/tiny-base")) == snap
    assert resolve_base(str(base_dir)) == str(base_dir)


def test_collection_offline_is_one_clear_error():
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match="could not list hf-collection://acme/loras"):
        build_catalog(["hf-collection://acme/loras-0123"])


def _client(*args: str, timeout: int = 180) -> dict:
    """The real huggingface_hub client in a fresh process: it reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE
    once, at import, and this session already imported it offline."""
    job = Path(__file__).with_name("hub_online_job.py")
    out = subprocess.run([sys.executable, str(job), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_large_collection_lists_every_model_through_the_real_client(tmp_path):
    """huggingface_hub's get_collection is one GET that returns every item (no paging in the client): 2,500
    models plus other item types, served by the loopback stand-in Hub API (tests/engine/hub_standin.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_standin import StandInHub

    items = [{"_id": str(i), "id": f"acme/lora-{i:04d}", "type": "model" if i % 10 else "dataset", "position": i}
             for i in range(2750)]
    with StandInHub() as hub:
        hub.collections["acme/loras-0123"] = items
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint}
        code = ("import json; from engine.core.hub import collection_items; "
                "print(json.dumps(collection_items('hf-collection://acme/loras-0123')))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert listed == [f"hf://{it['id']}" for it in items if it["type"] == "model"] and len(listed) == 2475
    assert [r for r in hub.requests if "/api/collections/" in r] == ["GET /api/collections/acme/loras-0123"]


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, pool_dir):
    cache = tmp_path_factory.mktemp("hub-client")
    return _client("online", str(pool_dir), str(cache)), _client("offline", str(cache))


def test_collection_donors_are_pinned_to_commits_at_catalog_time(hub_runs):
    online, _ = hub_runs
    pinned = online["pinned"]
    for i in range(8):
        path, revision, error = pinned[f"acme/d{i}"]
        assert error is None and len(revision) == 40 and path == f"hf://acme/d{i}@{revision}"
    assert pinned["acme/gone"][2] == "hf://acme/gone: the Hub has no such model repo (or it is private or gated " \
                                     "and no token gives access)"


def test_downloads_are_parallel_and_bounded(hub_runs):
    online, _ = hub_runs
    assert online["pinned"]["max_in_flight_1"] == 1 and online["pinned"]["max_in_flight_3"] == 3
    assert online["seconds"]["3"] < online["seconds"]["1"]


def test_a_branch_moved_after_pinning_still_serves_the_pinned_commit(hub_runs):
    online, _ = hub_runs
    assert online["still_pinned_bytes"] == online["head_of_original"]
    first = online["pinned"]["acme/d0"][1]
    assert online["repinned"][1] != first and online["repinned"][0].endswith(online["repinned"][1])


def test_offline_uses_the_cache_the_client_filled_and_names_what_is_missing(hub_runs):
    online, offline = hub_runs
    entries = {donor: (path, rev) for donor, path, rev in offline["entries"]}
    for i in range(8):
        assert entries[f"acme/d{i}"] == tuple(online["pinned"][f"acme/d{i}"][:2])  # same commits, from refs/
        assert offline["fetched"][entries[f"acme/d{i}"][0]].endswith(entries[f"acme/d{i}"][1])
    message = offline["fetched"]["hf://acme/never-downloaded"]
    assert message.startswith("hf://acme/never-downloaded is not in the Hub cache") and "HF_HUB_OFFLINE=1" in message


def test_moved_revisions_are_rescored_not_mixed():
    from engine.scoring.catalog import moved_revisions
    from engine.core.donor import DonorEntry

    a, b = "a" * 40, "b" * 40
    rows = pd.DataFrame({"donor": ["x/one", "x/two", "x/three"], "status": ["ok", "ok", "failed"],
                         "sample_id": ["s", "s", "s"], "revision": [a, a, a]})
    entries = [DonorEntry("x/one", f"hf://x/one@{a}", revision=a), DonorEntry("x/two", f"hf://x/two@{b}", revision=b),
               DonorEntry("x/three", f"hf://x/three@{b}", revision=b)]
    assert moved_revisions(entries, rows, "s") == {"x/two": (a, b)}
    assert moved_revisions(entries, rows, "other-sample") == {}


def _move_branch(cache: Path, repo: str, folder: Path, commit: str) -> None:
    """What a download after a push leaves in the cache: a new snapshot, and refs/main pointing at it."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs" / "main").write_text(commit)


def test_scoring_hub_donors_offline_records_commits_and_rescores_a_moved_branch(ray_local, tmp_path, pool_dir,
                                                                                 task_file, base_dir):
    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

    cache = Path(os.environ["HF_HUB_CACHE"])
    publish_to_hf_cache(cache, "acme/score-a", pool_dir / "qv" / "donor1")
    publish_to_hf_cache(cache, "acme/score-b", pool_dir / "qkvo" / "donor2")
    donors = ["hf://acme/score-a", "hf://acme/score-b", "hf://acme/score-uncached"]
    cfg = ScoreConfig(base=str(base_dir), donors=donors, data=task_file, out=tmp_path / "out", samples=8, actors=1,
                      hub_concurrency=2)
    first = score(cfg)
    df = read_scores(cfg.out).set_index("donor")
    assert first.scored == 3 and first.failed == 1  # the base and two donors
    commit_a = (cache / "models--acme--score-a" / "refs" / "main").read_text()
    assert df.loc["acme/score-a", "revision"] == commit_a and df.loc["acme/score-a", "path"].endswith(commit_a)
    assert "acme/score-uncached" in first.failures
    assert first.failures["acme/score-uncached"].startswith("hf://acme/score-uncached is not in the Hub cache")
    placed = [json.loads(ln) for ln in (cfg.out / "placement.jsonl").read_text().splitlines()]
    assert {p["donor"]: p["source"] for p in placed}["acme/score-a"] == "hub" and all(p["node"] for p in placed)

    _move_branch(cache, "acme/score-a", pool_dir / "qv" / "donor3", "c" * 40)
    second = score(cfg)
    df2 = read_scores(cfg.out).set_index("donor")
    assert second.skipped_done == 1 and second.scored == 1  # score-b kept; score-a rescored at its new commit
    assert df2.loc["acme/score-a", "revision"] == "c" * 40 and df2.loc["acme/score-a", "loss"] != df.loc[
        "acme/score-a", "loss"]
    assert df2.loc["acme/score-b", "written_at"] == df.loc["acme/score-b", "written_at"]
