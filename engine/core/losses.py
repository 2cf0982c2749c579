"""Completion-token statistics from a causal LM, with the LM head applied only where the completion is.

Sequences are left-padded so every completion ends at the last position, and `logits_to_keep=K` (public
transformers API) keeps the last K positions, K = longest completion + 1. `completion_head` goes further for
scoring: a pre-hook on the output embedding gathers exactly the positions that predict completion tokens, so the
LM head (the largest matmul for 150k–256k vocabularies) runs on Σ completion tokens rows and nothing else.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from engine.core.data import Encoded

T = TypeVar("T")


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: int
    n_completion: torch.Tensor

    @property
    def predict_mask(self) -> torch.Tensor:
        """(B, K) True at tail positions whose next token is a completion token."""
        j = torch.arange(self.keep, device=self.input_ids.device).unsqueeze(0)
        return (j >= (self.keep - 1 - self.n_completion).unsqueeze(1)) & (j < self.keep - 1)


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


def model_inputs(batch: PaddedBatch) -> dict[str, torch.Tensor | int]:
    """The forward arguments every completion-loss call passes (scoring, evaluation and training alike)."""
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep)


def chunk_by_tokens(items: Sequence[T], length: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive chunks of length-sorted items whose padded size (longest × count) stays within `budget`."""
    chunk: list[T] = []
    for item in items:
        if chunk and length(item) * (len(chunk) + 1) > budget:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


@contextlib.contextmanager
def completion_head(model: torch.nn.Module, batch: PaddedBatch):
    """Within the block the model's logits are (Σ completion tokens, vocab): one row per predicted token."""
    head = model.get_output_embeddings()
    mask = batch.predict_mask

    def gather(_module, args):
        return (args[0][mask],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def completion_stats(logits: torch.Tensor, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (sum of NLL in nats, argmax hits, completion tokens), float64/int64.

    `logits` is either the (B, K, V) tail from `logits_to_keep=batch.keep`, or the (N, V) rows from `completion_head`.
    """
    mask = batch.predict_mask
    targets_tail = batch.input_ids[:, -batch.keep:].roll(-1, dims=1)
    if logits.dim() == 3:
        logits = logits[:, -batch.keep:][mask]
    targets = targets_tail[mask]
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logits = logits.float()
    tok_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hit = (logits.argmax(-1) == targets).long()
    n = mask.shape[0]
    nll = torch.zeros(n, dtype=torch.float64, device=mask.device).index_add_(0, rows, -tok_logp.double())
    hits = torch.zeros(n, dtype=torch.long, device=mask.device).index_add_(0, rows, hit)
    return nll, hits, mask.sum(-1)
