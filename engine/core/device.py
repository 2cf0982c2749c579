"""Device and dtype choices shared by scoring, finetuning and evaluation: 'auto' means CUDA when present,
bfloat16 on GPU and float32 on CPU."""
from __future__ import annotations


def resolve_device(device: str) -> str:
    """'auto' → cuda when available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """'auto' → bfloat16 on GPU, float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
