"""The TIES / DARE family as PEFT's `add_weighted_adapter` defines it, rewritten to stream.

Semantics: docs/contracts.md, "Merge semantics".

PEFT merges lora_A and lora_B separately: each factor of donor i is pruned (magnitude top-k for TIES, a random
keep-mask rescaled by 1/density for DARE), weighted by sqrt(w_i s_i), and either summed (dare_linear) or, after a
sign election on the pruned unweighted factors, averaged over the donors that agree with the elected sign
(ties, dare_ties). The election needs every donor before any can be added, so those methods take two passes; the
pruning is recomputed on the second pass, from a seed per (donor, module, factor) for the random masks.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from engine.merge.base import DonorModule, MergeMethod, MergeOptions, ModuleSpec


@dataclass
class FactorState:
    total: torch.Tensor  # Σ of weighted kept entries
    votes: torch.Tensor | None = None  # pass 1: Σ of pruned entries (or of their signs); pass 2: elected sign
    agreeing: torch.Tensor | None = None  # pass 2: how many donors agree with the elected sign


@dataclass
class SparseState:
    module: str
    factors: dict[str, FactorState]
    options: MergeOptions


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density · numel) largest-magnitude entries, as PEFT's magnitude_based_pruning."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def dare_keep_mask(shape: torch.Size, density: float, seed: int, donor_index: int, module: str,
                   factor: str) -> torch.Tensor:
    """Bernoulli(density) keep-mask from a seed of its own, so pass two and tests can rebuild it exactly."""
    digest = hashlib.sha256(f"{seed}|{donor_index}|{module}|{factor}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.bernoulli(torch.full(shape, density), generator=generator)


class SparseTaskArithmetic(MergeMethod):
    required_options = frozenset({"density"})

    def __init__(self, name: str, pruning: Literal["magnitude", "random"], elect_sign: bool):
        self.name = name
        self.pruning = pruning
        self.elect_sign = elect_sign
        self.passes = 2 if elect_sign else 1
        self.options = frozenset({"density"} | ({"majority_sign"} if elect_sign else set())
                                 | ({"seed"} if pruning == "random" else set()))

    def state_bytes(self, module: ModuleSpec, rank: int) -> int:
        return (3 if self.elect_sign else 1) * super().state_bytes(module, rank)

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> SparseState:
        shapes = {"A": module.a_shape(rank), "B": module.b_shape(rank)}
        factors = {f: FactorState(torch.zeros(shape), torch.zeros(shape) if self.elect_sign else None)
                   for f, shape in shapes.items()}
        return SparseState(module.key_stem, factors, options)

    def pruned(self, tensor: torch.Tensor, state: SparseState, donor_index: int, factor: str) -> torch.Tensor:
        density = state.options.density
        if density >= 1:
            return tensor
        if self.pruning == "magnitude":
            return magnitude_prune(tensor, density)
        mask = dare_keep_mask(tensor.shape, density, state.options.seed, donor_index, state.module, factor)
        return tensor * mask / density

    def add(self, state: SparseState, donor: DonorModule, pass_index: int) -> None:
        factor_weight = math.sqrt(donor.weight * donor.scale)
        for factor, tensor in (("A", donor.lora_A), ("B", donor.lora_B)):
            acc = state.factors[factor]
            pruned = self.pruned(tensor, state, donor.index, factor)
            if not self.elect_sign:
                acc.total.add_(pruned, alpha=factor_weight)
            elif pass_index == 0:
                acc.votes.add_(pruned if state.options.majority_sign == "total" else pruned.sign())
            else:
                if acc.agreeing is None:
                    acc.votes = torch.where(acc.votes >= 0, 1.0, -1.0)
                    acc.agreeing = torch.zeros_like(acc.total)
                agrees = (pruned.sign() == acc.votes).float()
                acc.total.add_(pruned * agrees, alpha=factor_weight)
                acc.agreeing.add_(agrees)

    def finish(self, state: SparseState) -> tuple[torch.Tensor, torch.Tensor]:
        merged = []
        for factor in ("A", "B"):
            acc = state.factors[factor]
            if self.elect_sign:
                agreeing = acc.agreeing if acc.agreeing is not None else torch.zeros_like(acc.total)
                merged.append(acc.total / agreeing.clamp(min=1.0))
            else:
                merged.append(acc.total)
        return merged[0], merged[1]
