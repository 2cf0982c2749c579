"""`mashup freeze` against the loopback stand-in Hub (the real huggingface_hub client, in a fresh process), and
manifests on shared storage allowed by trusted roots, nothing else."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.scoring.catalog import build_catalog
from engine.core.errors import ConfigError
from engine.scoring import ScoreConfig
from engine.core.validate import base_spec, validate_donor

sys.path.insert(0, str(Path(__file__).parent))
from hub_standin import StandInHub  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _cli(hub: StandInHub, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


def test_freeze_pins_a_collection_and_ids_to_commits(pool_dir, tmp_path):
    donors = sorted(p for p in pool_dir.glob("*/*") if p.is_dir())
    with StandInHub() as hub:
        shas = {f"acme/d{i}": hub.publish(f"acme/d{i}", donors[i]) for i in range(3)}
        tagged = hub.publish("acme/extra", donors[3], ref="v1")
        hub.publish("acme/extra", donors[4])  # main moves on; the v1 tag still names the first commit
        hub.collections["acme/pool"] = [{"_id": str(i), "id": f"acme/d{i}", "type": "model", "position": i}
                                        for i in range(3)] + [{"_id": "x", "id": "acme/data", "type": "dataset",
                                                               "position": 3}]
        out = tmp_path / "frozen.jsonl"
        done = _cli(hub, tmp_path / "cache", "freeze", "hf-collection://acme/pool", "hf://acme/extra@v1",
                    "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "froze 4 donors" in done.stdout
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        want = [{"id": f"acme/d{i}", "path": f"hf://acme/d{i}@{shas[f'acme/d{i}']}", "requested_revision": "main"}
            for i in range(3)]
        want.append({"id": "acme/extra@v1", "path": f"hf://acme/extra@{tagged}", "requested_revision": "v1"})
        assert rows == want
        hub.publish("acme/d0", donors[4])  # the collection's repo moves after freezing
        missing = tmp_path / "missing.jsonl"
        bad = _cli(hub, tmp_path / "cache", "freeze", "hf://acme/d1", "hf://acme/gone", "--out", str(missing))
    assert bad.returncode == 2 and not missing.exists()
    [line] = [ln for ln in bad.stderr.splitlines() if "error" in ln.lower()]
    assert line.startswith("mashup freeze: error: "), bad.stderr[-2000:]
    assert "1 of 2 donors not pinned, e.g. acme/gone" in line
    entries = build_catalog([str(out)])  # offline here: the pinned rows need no look-up and keep their commits
    assert [(e.donor, e.revision, e.error) for e in entries][0] == ("acme/d0", shas["acme/d0"], None)


def test_freeze_refuses_local_sources(tmp_path, pool_dir):
    from engine.freeze import freeze

    with pytest.raises(ConfigError, match="is not hf://"):
        freeze([str(pool_dir)], tmp_path / "m.jsonl")


@pytest.fixture
def shared_storage(tmp_path, pool_dir):
    """A manifest in one folder listing adapters by absolute path on "shared storage" elsewhere."""
    import shutil

    shared = tmp_path / "shared"
    shutil.copytree(pool_dir / "qv" / "donor1", shared / "team" / "d1")
    (shared / "team" / "escape").symlink_to(pool_dir / "qv" / "donor3", target_is_directory=True)
    manifest = tmp_path / "study" / "manifest.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"id": "d1", "path": str(shared / "team" / "d1")}) + "\n"
                        + json.dumps({"id": "link", "path": str(shared / "team" / "escape")}) + "\n")
    return shared, manifest


def test_absolute_paths_are_refused_with_the_way_to_allow_them(shared_storage, monkeypatch):
    monkeypatch.delenv("MASHUP_TRUSTED_ROOTS", raising=False)
    _, manifest = shared_storage
    [entry, _] = build_catalog([str(manifest)])
    assert "escapes the manifest folder" in entry.error
    assert "score.trusted_roots" in entry.error and "MASHUP_TRUSTED_ROOTS" in entry.error


@pytest.mark.parametrize("how", ["config", "env"])
def test_trusted_roots_allow_shared_storage_and_nothing_beyond(shared_storage, base_dir, monkeypatch, how):
    shared, manifest = shared_storage
    monkeypatch.delenv("MASHUP_TRUSTED_ROOTS", raising=False)
    if how == "env":
        monkeypatch.setenv("MASHUP_TRUSTED_ROOTS", os.pathsep.join(["/nonexistent/elsewhere", str(shared)]))
        trusted = []
    else:
        trusted = ScoreConfig(base="b", donors=[str(manifest)], data="x.jsonl", out="o",
                              trusted_roots=[shared]).trusted_roots
    d1, link = build_catalog([str(manifest)], trusted=trusted)
    assert d1.error is None and d1.root == str(shared)
    validate_donor(d1.donor, d1.path, base_spec(str(base_dir)), root=d1.root)
    # a symlink inside the trusted root that leads out of it is still refused (paths are compared resolved)
    assert "escapes the manifest folder" in link.error


def test_relative_trusted_root_is_a_config_error(shared_storage):
    _, manifest = shared_storage
    with pytest.raises(ConfigError, match="trusted_roots: 'team' is not an absolute path"):
        build_catalog([str(manifest)], trusted=["team"])
