"""The contract every merge method implements: stream donors one at a time into per-module float32 state.

The driver (streaming.py) owns files, order and memory; a method only says how one donor's (A, B) pair of one
module updates that module's state, and how the state becomes the merged (A, B). That split is what lets every
method stream with memory that does not grow with the number of donors (docs/contracts.md, "Merge semantics").
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-adapted module of the union of donors; shapes are given without the rank."""

    name: str
    a_key: str
    b_key: str
    a_tail: tuple[int, ...]  # lora_A shape is (rank, *a_tail)
    b_head: int  # lora_B shape is (b_head, rank, *b_tail)
    b_tail: tuple[int, ...] = ()

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, *self.a_tail)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (self.b_head, rank, *self.b_tail)

    @property
    def key_stem(self) -> str:
        """The module's name as its output keys spell it (`base_model.model.<path>`): seeds per-module randomness."""
        return self.a_key.rsplit(".lora_", 1)[0]

    @property
    def is_matrix(self) -> bool:
        return len(self.a_tail) == 1 and not self.b_tail


@dataclass(frozen=True)
class DonorModule:
    """One donor's factors of one module, as float32 (in the file's dtype for a method with float32_inputs False),
    with its merge weight and LoRA scale.

    The factors may be reused buffers: a method copies what it keeps beyond `add`.
    """

    index: int  # position in the donor list: seeds reproducible random masks
    weight: float
    scale: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass(frozen=True)
class MergeOptions:
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    svd_rank: int | None = None
    shared_scale: bool = True  # every donor has the same alpha/r (and rsLoRA flag)
    donor_ranks: tuple[int, ...] = field(default_factory=tuple)


class MergeMethod:
    """Base class; subclasses override `begin`, `add`, `finish` and the class attributes that differ."""

    name: str = ""
    passes: int = 1
    equal_ranks: bool = True
    options: frozenset[str] = frozenset()  # which of density / majority_sign / seed / svd_rank apply
    required_options: frozenset[str] = frozenset()
    float32_inputs: bool = True  # False: `add` takes the donor's own dtype (it only adds into float32 state)

    def output_rank(self, options: MergeOptions) -> int:
        return options.donor_ranks[0]

    def keeps_donor_scale(self, options: MergeOptions) -> bool:
        """True: the output keeps the donors' lora_alpha; False: scales are folded in and alpha = r."""
        return False

    def state_bytes(self, module: ModuleSpec, rank: int) -> int:
        """float32 bytes held for one module while donors stream: the driver groups modules by this."""
        return 4 * (math.prod(module.a_shape(rank)) + math.prod(module.b_shape(rank)))

    def begin(self, module: ModuleSpec, rank: int, options: MergeOptions) -> Any:
        raise NotImplementedError

    def add(self, state: Any, donor: DonorModule, pass_index: int) -> None:
        raise NotImplementedError

    def add_donor(self, states: Sequence[Any], modules: Sequence[DonorModule], pass_index: int) -> None:
        """All modules of one donor at once; a method may override it to batch many small tensor ops."""
        for state, module in zip(states, modules):
            self.add(state, module, pass_index)

    def finish(self, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

