"""`cat`: the exact ΔW = Σ w_i s_i B_i A_i, by stacking the donors' ranks (rank = Σ r_i).

Semantics: docs/contracts.md, "Merge semantics".

Donor i owns rows offset_i .. offset_i + r_i of A (scaled by w_i s_i, as PEFT does) and the same columns of B; a
donor without the module leaves its block zero. The output grows with N by construction of the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from engine.merge.base import DonorModule, MergeMethod, MergeOptions, ModuleSpec


@dataclass
class CatState:
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    offsets: tuple[int, ...]


class CatMerge(MergeMethod):
    name = "cat"
    equal_ranks = False

    def output_rank(self, options: MergeOptions) -> int:
        return sum(options.donor_ranks)

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> CatState:
        offsets = (0, *accumulate(options.donor_ranks))
        return CatState(torch.zeros(module.a_shape(rank)), torch.zeros(module.b_shape(rank)), offsets)

    def add(self, state: CatState, donor: DonorModule, pass_index: int) -> None:
        start, stop = state.offsets[donor.index], state.offsets[donor.index + 1]
        state.lora_A[start:stop].copy_(donor.lora_A).mul_(donor.weight * donor.scale)
        state.lora_B[:, start:stop].copy_(donor.lora_B)

    def finish(self, state: CatState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.lora_A, state.lora_B


CAT = CatMerge()
