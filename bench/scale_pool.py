"""A large synthetic donor pool made from the demo world's trained donors: convex mixes of two donors plus noise.

Each synthetic donor takes two trained donors i, j, a mix weight α ~ U(0, 1), and a noise level σ, log-uniform
over [0.01, 1] of each tensor's RMS: A = αAᵢ + (1-α)Aⱼ + σ·rms·N(0, 1), likewise B. Near-copies of the donors that
suit the target score well, heavy mixes and noise score badly, so losses spread as in a real, mostly unrelated pool.
The pool is deterministic (one seed per donor) and cached under `.cache/scale/`; a manifest lists the donors.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

WORLD = Path(".cache/worlds/demo")
CACHE = Path(".cache/scale")
VERSION = 1


def ensure_demo_world() -> Path:
    """The trained mini world; built (deterministically, a few minutes) when missing."""
    if not (WORLD / "world.json").exists():
        subprocess.run([sys.executable, "-m", "bench.world.build", "--scale", "demo"], check=True)
    return WORLD


def trained_donors(world: Path) -> list[Path]:
    return sorted(p.parent for p in (world / "donors").glob("*/*/adapter_model.safetensors"))


def build_pool(n: int, seed: int = 0) -> Path:
    """`n` synthetic PEFT donors and `manifest.jsonl` (with each donor's recipe); reused when already built."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    world = ensure_demo_world()
    root = CACHE / f"pool-v{VERSION}-n{n}-s{seed}"
    manifest = root / "manifest.jsonl"
    if manifest.exists():
        return manifest
    shutil.rmtree(root, ignore_errors=True)
    sources = trained_donors(world)
    weights = [load_file(str(s / "adapter_model.safetensors")) for s in sources]
    config = (sources[0] / "adapter_config.json").read_text()
    rows = []
    for d in tqdm(range(n), desc="building donors", unit="donor"):
        rng = random.Random(f"{seed}:{d}")
        i, j = rng.sample(range(len(sources)), 2)
        alpha = rng.random()
        sigma = math.exp(rng.uniform(math.log(0.01), math.log(1.0)))
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        mixed = {}
        for key, a in weights[i].items():
            t = alpha * a + (1 - alpha) * weights[j][key]
            rms = t.pow(2).mean().sqrt()
            mixed[key] = (t + sigma * rms * torch.randn(t.shape, generator=gen)).contiguous()
        folder = root / f"d{d:05d}"
        folder.mkdir(parents=True)
        save_file(mixed, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(config)
        rows.append({"id": folder.name, "path": folder.name, "mix": [sources[i].parent.name, sources[j].parent.name],
                     "alpha": round(alpha, 4), "noise": round(sigma, 4)})
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(manifest)
    return manifest


def sub_manifest(manifest: Path, n: int) -> Path:
    """The first `n` donors of the pool, as a manifest beside it (the pool-size sweep)."""
    out = manifest.parent / f"manifest-first{n}.jsonl"
    if not out.exists():
        lines = manifest.read_text().splitlines(keepends=True)[:n]
        out.write_text("".join(lines))
    return out
