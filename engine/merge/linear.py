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
    float32_inputs = False  # `_foreach_add_` into the float32 state promotes bf16 factors exactly as a cast would

    def keeps_donor_scale(self, options: MergeOptions) -> bool:
        return options.shared_scale

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> LinearState:
        return LinearState(torch.zeros(module.a_shape(rank)), torch.zeros(module.b_shape(rank)),
                           fold_scale=not options.shared_scale)

    def add(self, state: LinearState, donor: DonorModule, pass_index: int) -> None:
        state.lora_A.add_(donor.lora_A, alpha=donor.weight)
        state.lora_B.add_(donor.lora_B, alpha=donor.weight * donor.scale if state.fold_scale else donor.weight)

    def add_donor(self, states: Sequence[LinearState], modules: Sequence[DonorModule], pass_index: int) -> None:
        """One donor's modules in a few batched adds. Modules are grouped by the weight their B gets: when scales
        are folded, a donor's alpha_pattern gives its modules different scales, so one alpha per donor is wrong."""
        groups: dict[float, tuple[list[LinearState], list[DonorModule]]] = {}
        for state, module in zip(states, modules):
            b_weight = module.weight * module.scale if state.fold_scale else module.weight
            group = groups.setdefault(b_weight, ([], []))
            group[0].append(state)
            group[1].append(module)
        for b_weight, (group_states, group_modules) in groups.items():
            weight = group_modules[0].weight
            torch._foreach_add_([s.lora_A for s in group_states], [m.lora_A for m in group_modules], alpha=weight)
            torch._foreach_add_([s.lora_B for s in group_states], [m.lora_B for m in group_modules], alpha=b_weight)

    def finish(self, state: LinearState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.lora_A, state.lora_B


LINEAR = LinearMerge()
