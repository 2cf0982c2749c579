"""Re-factor a merged module to a given rank and alpha, by SVD of its ΔW: what makes merged arms train like scratch.

A merge's output rank and scale depend on its method (`cat` has rank Σ r_i at scale 1, `svd` rank r at scale 1,
`linear` the donors' r and alpha), while the scratch baseline trains a fresh LoRA at finetune.lora's r and alpha.
Re-factoring every arm's ΔW to that r and alpha gives every arm the same number of trainable parameters and the
same scale, so the comparison is the init alone. ΔW is kept up to the SVD truncation: B' = U_r S_r / s', A' = V_r^T
with s' = alpha'/r' (the singular values go to B, as in PEFT's svd merge and ours).
"""
from __future__ import annotations

import torch

from engine.core.errors import ConfigError


def lora_scale(config: dict) -> float:
    """The scale PEFT applies to B A for an adapter config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def refactor_module(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, rank: int,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank `rank` with (alpha/rank) B' A' = the best rank-`rank` approximation of scale · B A."""
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ConfigError(f"refactor_rank: module {name} has non-matrix LoRA factors; it cannot be re-factored")
    if rank > min(lora_B.shape[0], lora_A.shape[1]):
        raise ConfigError(f"refactor_rank: {rank} exceeds the size of module {name} "
                          f"({lora_B.shape[0]} x {lora_A.shape[1]})")
    u, s, vh = torch.linalg.svd(scale * (lora_B.float() @ lora_A.float()), full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] * (s[:rank] * rank / alpha)).contiguous()
