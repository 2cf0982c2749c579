"""Merge output on disk: a valid streamed safetensors, merge_info.json, and no partial adapter after a failure."""
from __future__ import annotations
from engine.api import merge

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.core.errors import ConfigError, DonorError, MashupError
from engine.merge.io import SafetensorsStreamWriter
from engine.core.version import __version__


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*"))


def test_stream_writer_output_loads_with_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7, 2), "c": torch.randn(1, 1)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors"
        writer = SafetensorsStreamWriter(path, [(k, tuple(v.shape)) for k, v in tensors.items()], dtype)
        for key, value in tensors.items():
            writer.write(key, value)
        writer.close()
        loaded = load_file(str(path))
        assert loaded.keys() == tensors.keys()
        for key, value in tensors.items():
            assert loaded[key].dtype == dtype and torch.equal(loaded[key], value.to(dtype))


def test_stream_writer_refuses_out_of_order_tensors(tmp_path):
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", (2,)), ("b", (2,))], torch.float32)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(2))
    writer.abort()


def test_merge_info_records_method_donors_weights_hashes_and_version(donors, tmp_path):
    inputs = [donors["qv1"], donors["qv3"]]
    out = merge(inputs, weights=[1, 3], out=tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "merge_info.json"]
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == "linear" and info["donors"] == [str(p) for p in inputs]
    assert info["weights"] == pytest.approx([0.25, 0.75]) and info["engine_version"] == __version__
    assert info["sha256"] == [hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest() for p in inputs]


def test_whole_file_and_per_key_reads_merge_and_hash_the_same(donors, tmp_path, monkeypatch):
    """One module group: each file is read once, whole, and its digest is of those bytes. A merge split into
    groups reads tensors by key and hashes apart. Both give the same adapter, digests and key, for a bf16 pool
    that `linear` adds without staging it into float32, and for `cat`, which takes float32 factors."""
    from engine.merge import MergeConfig, io
    from engine.merge.streaming import merge_with_config

    inputs = []
    for name in ("qv1", "qv3"):  # bf16 copies of the fixture donors
        folder = tmp_path / f"bf16-{name}"
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((donors[name] / "adapter_config.json").read_bytes())
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(donors[name] / "adapter_model.safetensors").items()},
                  folder / "adapter_model.safetensors")
        inputs.append(folder)
    made = []
    init = io.DonorReads.__init__
    monkeypatch.setattr(io.DonorReads, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    for method in ("linear", "cat"):
        whole = merge_with_config(MergeConfig(donors=[str(p) for p in inputs], weights=[1, 3], method=method,
                                              out=tmp_path / f"{method}-whole"))
        split = merge_with_config(MergeConfig(donors=[str(p) for p in inputs], weights=[1, 3], method=method,
                                              out=tmp_path / f"{method}-split", accumulator_mb=0.001))
        assert [r.whole for r in made[-2:]] == [True, False], "the first reads each file whole, the second by key"
        assert made[-2].staging is None if method == "linear" else made[-2].staging is not None
        assert (whole / "adapter_model.safetensors").read_bytes() == (split / "adapter_model.safetensors").read_bytes()
        info = [json.loads((o / "merge_info.json").read_text()) for o in (whole, split)]
        assert info[0]["sha256"] == info[1]["sha256"] == [
            hashlib.sha256((p / "adapter_model.safetensors").read_bytes()).hexdigest() for p in inputs]
        assert info[0]["key"] == info[1]["key"]


def test_hasher_helper_process_matches_hashlib(donors):
    from engine.merge.io import DonorHasher

    files = [donors[name] / "adapter_model.safetensors" for name in ("qv1", "qkvo2", "qv3")]
    expected = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with DonorHasher(files, helper_min_bytes=0) as hasher:
        assert hasher.process is not None  # the helper really runs
        assert hasher.result() == expected
    with DonorHasher(files) as hasher:  # small merges hash in-process
        assert hasher.process is None and hasher.result() == expected


def test_exception_mid_stream_leaves_no_adapter(donors, nan_donor, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(MashupError, match="not finite"):  # raised after earlier modules were written
        merge([donors["qv1"], nan_donor], out=out)
    assert not out.exists() and leftovers(out) == []


def test_sigkilled_merge_leaves_no_adapter_and_the_next_merge_cleans_up(donors, tmp_path):
    out = tmp_path / "merged"
    script = (f"from engine.api import merge; merge([{str(donors['qv1'])!r}] * 3000, out={str(out)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any((tmp_path / name / "adapter_model.safetensors").exists() for name in leftovers(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "merge ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and leftovers(out)  # only a hidden temp folder remains
    merge([donors["qv1"]], out=out)
    assert out.is_dir() and leftovers(out) == []


def test_existing_output_needs_overwrite(donors, tmp_path):
    out = merge([donors["qv1"]], out=tmp_path / "merged")
    with pytest.raises(ConfigError, match="already exists"):
        merge([donors["qv3"]], out=out)
    merge([donors["qv3"]], out=out, overwrite=True)
    assert json.loads((out / "merge_info.json").read_text())["donors"] == [str(donors["qv3"])]
    assert leftovers(out) == []


def test_unusable_donors_are_named(donors, pickle_donor, tmp_path):
    with pytest.raises(DonorError, match="refusing to unpickle"):
        merge([donors["qv1"], pickle_donor], out=tmp_path / "x")
    with pytest.raises(DonorError, match="not found"):
        merge([donors["qv1"], tmp_path / "nowhere"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_group_finiteness_check_names_the_module_and_accepts_huge_finite_factors():
    from engine.merge.base import ModuleSpec
    from engine.merge.streaming import check_finite

    spec = lambda name: ModuleSpec(name, f"{name}.lora_A.weight", f"{name}.lora_B.weight", (4,), 3)  # noqa: E731
    huge = torch.full((2, 4), 3e30)  # finite, but its norm overflows float32: the per-module check decides
    check_finite([(spec("q"), huge, torch.ones(3, 2)), (spec("v"), torch.ones(2, 4), torch.ones(3, 2))])
    bad = torch.ones(3, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(MashupError, match="merged module v is not finite"):
        check_finite([(spec("q"), huge, torch.ones(3, 2)), (spec("v"), torch.ones(2, 4), bad)])
