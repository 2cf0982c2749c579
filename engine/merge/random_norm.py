"""`random-norm`: the null control. Random A and B per module with the Frobenius norms of the `linear` merge's.

The 2026 recycling study ("The Appeal and Reality of Recycling LoRAs") finds that much of a recycled init's gain
comes from its scale, not from what the donors learned. This init has the merge's per-module norms (so the same
step size through the same scale) and none of its directions: an arm trained from it measures the "any LoRA of
this size" effect. The entries are N(0, 1), rescaled to the norm, from a generator seeded per (seed, module, factor).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.merge.base import MergeOptions, ModuleSpec
from engine.merge.linear import LinearMerge, LinearState


@dataclass
class RandomNormState(LinearState):
    module: str = ""
    seed: int = 0


def random_like_norm(tensor: torch.Tensor, seed: int, module: str, factor: str) -> torch.Tensor:
    """A seeded N(0, 1) tensor of `tensor`'s shape rescaled to its Frobenius norm (zero stays zero)."""
    digest = hashlib.sha256(f"random-norm|{seed}|{module}|{factor}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    return noise * (torch.linalg.vector_norm(tensor) / torch.linalg.vector_norm(noise))


class RandomNormMerge(LinearMerge):
    name = "random-norm"
    options = frozenset({"seed"})

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> RandomNormState:
        return RandomNormState(torch.zeros(module.a_shape(rank)), torch.zeros(module.b_shape(rank)),
                               fold_scale=not options.shared_scale, module=module.name, seed=options.seed)

    def finish(self, state: RandomNormState) -> tuple[torch.Tensor, torch.Tensor]:
        return (random_like_norm(state.lora_A, state.seed, state.module, "A"),
                random_like_norm(state.lora_B, state.seed, state.module, "B"))


RANDOM_NORM = RandomNormMerge()
