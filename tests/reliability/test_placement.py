"""Multi-node placement on a `ray.cluster_utils.Cluster` (two worker raylets standing in for nodes): actors spread
over nodes, custom resources and node labels pin them, each node fetches its donors from its own Hub cache, the
driver never opens a donor file, and the scores do not depend on where they were computed.

The cluster needs a Ray of its own, so the jobs run in a subprocess (tests/reliability/placement_job.py) and never
touch the session's local Ray.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import publish_to_hf_cache

DONORS = ["qv/donor1", "qkvo/donor2", "qv/donor3", "qkvo/donor4"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, pool_dir, task_file, base_dir) -> dict:
    root = tmp_path_factory.mktemp("placement")
    (root / "caches" / "driver").mkdir(parents=True)
    for node in ("a", "b"):  # each node's own cache holds the donors, as after a download there
        for i, donor in enumerate(DONORS):
            publish_to_hf_cache(root / "caches" / node, f"acme/p{i}", pool_dir / donor)
    script = Path(__file__).with_name("placement_job.py")
    done = subprocess.run(
        [sys.executable, str(script), "--base", str(base_dir), "--data", str(task_file), "--out", str(root / "out"),
         "--caches", str(root / "caches"), "--donors", *[f"hf://acme/p{i}" for i in range(len(DONORS))]],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def _nodes(job: dict) -> dict[str, str]:
    return {p["donor"]: p["node"] for p in job["placement"]}


@pytest.mark.slow
def test_spread_puts_actors_on_distinct_nodes_that_have_the_resource(report):
    job, nodes = report["jobs"]["spread"], report["nodes"]
    assert job["scored"] == len(DONORS) + 1 and job["failed"] == 0
    used = {(p["node"], p["pid"]) for p in job["placement"]}
    assert len(used) == 2 and {node for node, _ in used} == {nodes["a"], nodes["b"]}  # never the head
    assert all(p["source"] == "hub" for p in job["placement"] if p["donor"] != "__base__")


@pytest.mark.slow
def test_custom_resources_and_labels_pin_actors_to_a_node(report):
    nodes = report["nodes"]
    assert set(_nodes(report["jobs"]["pinned"]).values()) == {nodes["a"]}
    # node a advertises node_a: 1, so a second actor asking for it cannot be placed: one scorer per node, and the
    # job still completes on the one that was.
    assert len({p["pid"] for p in report["jobs"]["pinned"]["placement"]}) == 1
    assert report["jobs"]["pinned"]["scored"] == len(DONORS) + 1
    assert set(_nodes(report["jobs"]["labelled"]).values()) == {nodes["b"]}


@pytest.mark.slow
def test_donors_are_fetched_on_the_scoring_node_never_through_the_driver(report):
    assert report["driver_saw_data_file"]  # the audit hook records the driver's own reads...
    assert report["driver_opened"] == [] and report["driver_cache"] == []  # ...and none of a donor's
    commits = {json.dumps(job["revision"], sort_keys=True) for job in report["jobs"].values()}
    assert len(commits) == 1  # each node resolved the same commit from its own cache
    revisions = report["jobs"]["spread"]["revision"]
    assert all(len(revisions[f"acme/p{i}"]) == 40 for i in range(len(DONORS)))


@pytest.mark.slow
def test_scores_do_not_depend_on_placement(report):
    spread, pinned, labelled = (report["jobs"][k]["loss"] for k in ("spread", "pinned", "labelled"))
    assert set(spread) == set(pinned) == set(labelled) and len(spread) == len(DONORS) + 1
    for donor, loss in spread.items():
        assert abs(loss - pinned[donor]) < 1e-5 and abs(loss - labelled[donor]) < 1e-5
