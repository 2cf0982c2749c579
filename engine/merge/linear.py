"""`linear`, the Mashup default: A = Σ w_i A_i and B = Σ w_i B_i per module (docs/contracts.md, "Merge semantics").

Unlike PEFT's `linear`, which scales both factors by sqrt(w_i s_i), this is the plain weighted mean of the factors;
the two agree on ΔW only for uniform weights and equal scales. Differing scales are folded into B (alpha = r).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engine.merge.base import DonorModule, MergeMethod, MergeOptions, ModuleSpec


@dataclass
class LinearState:
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    fold_scale: bool


class LinearMerge(MergeMethod):
    name = "linear"

    def keeps_donor_scale(self, options: MergeOptions) -> bool:
        return options.shared_scale

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> LinearState:
        return LinearState(torch.zeros(module.a_shape(rank)), torch.zeros(module.b_shape(rank)),
                           fold_scale=not options.shared_scale)

    def add(self, state: LinearState, donor: DonorModule, pass_index: int) -> None:
        state.lora_A.add_(donor.lora_A, alpha=donor.weight)
        state.lora_B.add_(donor.lora_B, alpha=donor.weight * donor.scale if state.fold_scale else donor.weight)

    def add_donor(self, states: Sequence[LinearState], modules: Sequence[DonorModule], pass_index: int) -> None:
        if not modules:
            return
        donor = modules[0]
        b_weight = donor.weight * donor.scale if states[0].fold_scale else donor.weight
        torch._foreach_add_([s.lora_A for s in states], [m.lora_A for m in modules], alpha=donor.weight)
        torch._foreach_add_([s.lora_B for s in states], [m.lora_B for m in modules], alpha=b_weight)

    def finish(self, state: LinearState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.lora_A, state.lora_B


LINEAR = LinearMerge()
