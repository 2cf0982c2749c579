"""Donors for the merge tests: the shared pool plus a few tiny variants (another scale, bf16, a NaN)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="session")
def donors(pool_dir) -> dict[str, Path]:
    """qv1, qv3, qv5: r=8 on q/v; qkvo2, qkvo4: r=4 on q/k/v/o (all alpha = 2r, so scale 2)."""
    return {f"{family}{seed}": pool_dir / family / f"donor{seed}"
            for family, seeds in (("qv", (1, 3, 5)), ("qkvo", (2, 4))) for seed in seeds}


@pytest.fixture(scope="session")
def scaled_donor(world, base_dir) -> Path:
    """r=8 on q/v like qv*, but alpha=4: scale 0.5 instead of 2."""
    from bench.world.tiny import write_lora_adapter

    return write_lora_adapter(base_dir, world / "merge_extra" / "scaled", seed=11, r=8, alpha=4,
                              target_modules=("q_proj", "v_proj"), init_std=0.2)


def copy_with_tensors(source: Path, target: Path, edit) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file(edit(tensors), str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def bf16_donors(world, donors) -> list[Path]:
    return [copy_with_tensors(donors[name], world / "merge_extra" / f"{name}_bf16",
                              lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
            for name in ("qv1", "qv3")]


@pytest.fixture(scope="session")
def nan_donor(world, donors) -> Path:
    """qv3 with NaN in the last layer's v_proj: the merge fails only after earlier modules were written."""
    def poison(tensors):
        key = sorted(k for k in tensors if "v_proj.lora_B" in k)[-1]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        return tensors

    return copy_with_tensors(donors["qv3"], world / "merge_extra" / "nan", poison)


@pytest.fixture(scope="session")
def pickle_donor(world, donors) -> Path:
    """A donor whose weights are only in the pickle format the merge refuses to load."""
    target = world / "merge_extra" / "pickled"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(donors["qv1"] / "adapter_config.json", target)
    (target / "adapter_model.bin").write_bytes(b"not loaded")
    return target

