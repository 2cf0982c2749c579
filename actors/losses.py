"""Completion-token statistics from a causal LM, with the LM head applied only where the completion is.

Sequences are left-padded so that every completion ends at the last position; then `logits_to_keep=K` (public
transformers API) computes logits for the last K positions only, K = longest completion + 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engine.data import Encoded


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: int
    n_completion: torch.Tensor


def left_pad(examples: Sequence[Encoded], pad_id: int, device: str | torch.device = "cpu") -> PaddedBatch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, length - len(e.input_ids):] = torch.tensor(e.input_ids)
        mask[i, length - len(e.input_ids):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n_c = torch.tensor([e.n_completion for e in examples])
    return PaddedBatch(ids.to(device), mask.to(device), pos.to(device), int(n_c.max()) + 1, n_c.to(device))


def completion_stats(logits_tail: torch.Tensor, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (sum of NLL in nats, number of argmax hits, number of completion tokens), in float64/int64."""
    k = batch.keep
    targets = batch.input_ids[:, -k + 1:]
    logits = logits_tail[:, -k:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    j = torch.arange(k - 1, device=targets.device).unsqueeze(0)
    mask = j >= (k - 1 - batch.n_completion).unsqueeze(1)
    nll = -(tok_logp.double() * mask).sum(-1)
    hits = ((logits.argmax(-1) == targets) & mask).sum(-1)
    return nll, hits, mask.sum(-1)
