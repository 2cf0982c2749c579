"""Test helpers for hostile inputs and the Hub: malformed donors, and a folder laid out as the HF cache lays out a repo."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.world.tiny import write_lora_adapter


def write_bad_donors(good: str | Path, out_root: str | Path, other_base: str | Path) -> dict[str, str]:
    """Malformed and hostile donors made from one good donor: name → a phrase its error must contain.

    `other_base` is a base of a different width, for the wrong-base donor.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    good, root = Path(good), Path(out_root)
    expect: dict[str, str] = {}

    def clone(name: str) -> Path:
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    def edit_config(folder: Path, **changes) -> None:
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(changes)
        cfg_path.write_text(json.dumps(cfg))

    weights = "adapter_model.safetensors"
    write_lora_adapter(other_base, root / "wrong_base", seed=7)
    expect["wrong_base"] = "shape mismatch"
    edit_config(clone("missing_target"), target_modules=["q_proj", "v_proj", "w_proj"])
    expect["missing_target"] = "not found in the base model"
    edit_config(clone("rank_mismatch"), r=4)
    expect["rank_mismatch"] = "rank mismatch"
    f = clone("nan_weights") / weights
    tensors = load_file(str(f))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(f))
    expect["nan_weights"] = "non-finite"
    f = clone("truncated") / weights
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect["truncated"] = "corrupt"
    f = clone("huge_header") / weights
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])
    expect["huge_header"] = "header claims"
    d = clone("bin_only")
    torch.save({"not": torch.zeros(1)}, d / "adapter_model.bin")
    (d / weights).unlink()
    expect["bin_only"] = "refusing to unpickle"
    (clone("missing_config") / "adapter_config.json").unlink()
    expect["missing_config"] = "missing adapter_config.json"
    edit_config(clone("not_lora"), peft_type="IA3")
    expect["not_lora"] = "unsupported adapter type"
    edit_config(clone("remote_code"), trust_remote_code=True)
    expect["remote_code"] = "custom code"
    return expect


def publish_to_hf_cache(cache_dir: str | Path, repo_id: str, folder: str | Path, revision: str = "main") -> Path:
    """Lay a folder out as `huggingface_hub` caches a model repo, so Hub code runs offline against it."""
    import hashlib
    import shutil

    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap, dirs_exist_ok=True)
    return snap
