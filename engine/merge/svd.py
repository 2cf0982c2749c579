"""`svd`: the exact ΔW = Σ w_i s_i B_i A_i, truncated to rank r by SVD per module.

Semantics: docs/contracts.md, "Merge semantics".

ΔW is accumulated densely (out × in float32 per module), which keeps memory flat in N; r defaults to the
largest donor rank, as in PEFT. B = U_r diag(S_r) and A = V_r^T, also as in PEFT, so alpha = r.
"""
from __future__ import annotations

import torch

from engine.core.errors import ConfigError
from engine.merge.base import DonorModule, MergeMethod, MergeOptions, ModuleSpec


class SvdMerge(MergeMethod):
    name = "svd"
    equal_ranks = False
    options = frozenset({"svd_rank"})

    def output_rank(self, options: MergeOptions) -> int:
        return options.svd_rank or max(options.donor_ranks)

    def state_bytes(self, module: ModuleSpec, rank: int) -> int:
        return 4 * module.b_head * module.a_tail[0]

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> tuple[torch.Tensor, int]:
        if not module.is_matrix:
            raise ConfigError(f"method svd: module {module.name} has non-matrix LoRA factors; use linear or cat")
        if rank > min(module.b_head, module.a_tail[0]):
            raise ConfigError(f"svd_rank: {rank} exceeds the size of module {module.name} "
                              f"({module.b_head} x {module.a_tail[0]})")
        return torch.zeros(module.b_head, module.a_tail[0]), rank

    def add(self, state: tuple[torch.Tensor, int], donor: DonorModule, pass_index: int) -> None:
        delta, _ = state
        delta.addmm_(donor.lora_B, donor.lora_A, alpha=donor.weight * donor.scale)

    def finish(self, state: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, torch.Tensor]:
        delta, rank = state
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


SVD = SvdMerge()
