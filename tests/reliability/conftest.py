"""Faulty donors for the fault-injection tests, each built from a real donor of the session's tiny world."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest

WEIGHTS = "adapter_model.safetensors"


class PickleBomb:
    """Unpickling this creates `marker`: if the marker ever exists, someone unpickled a donor."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def clone(good: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(good, dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def faults(world, base_dir, pool_dir) -> Path:
    """One folder per faulty donor (so each can be a source on its own), plus the pickle bomb's marker path."""
    import torch
    from safetensors.torch import load_file, save_file

    root = world / "faults"
    good = pool_dir / "qv" / "donor1"
    tensors = load_file(str(good / WEIGHTS))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("inf")
    save_file(tensors, str(clone(good, root / "inf_weights") / WEIGHTS))

    raw = (good / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[first] = {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**64]}
    blob = json.dumps(header).encode()
    (clone(good, root / "huge_tensor") / WEIGHTS).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])

    bomb = clone(good, root / "pickle_bomb")
    (bomb / WEIGHTS).unlink()
    (bomb / "adapter_model.bin").write_bytes(pickle.dumps(PickleBomb(root / "UNPICKLED")))

    clone(good, root / "nan_alpha", lora_alpha=float("nan"))  # finite weights, NaN scale: a NaN loss
    clone(good, root / "bad_target_type", target_modules=["q_proj", 42])  # crashes validation itself

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # A real PEFT adapter that also saves the final norm: PEFT refuses mixed-adapter batches through it.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(root / "norm_saver"))

    outside = clone(good, world / "outside_pool" / "donor")
    (root / "sym_pool").mkdir()
    clone(good, root / "sym_pool" / "real")
    (root / "sym_pool" / "escaping").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def pickle_bomb() -> type[PickleBomb]:
    return PickleBomb


@pytest.fixture(scope="session")
def many_donors(world, pool_dir) -> Path:
    """A manifest of 16 ids over the 5 pool donors: long enough to be interrupted mid-run."""
    folder = world / "many"
    shutil.copytree(pool_dir, folder / "p")
    donors = sorted((folder / "p").glob("*/*"))
    rows = [{"id": f"d{i:02d}", "path": str(donors[i % len(donors)].relative_to(folder))} for i in range(16)]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
