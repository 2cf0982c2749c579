"""LoRA slots, after vLLM's LoRA manager: inject N PEFT adapters once, then load a donor by copying its tensors.

PEFT's `load_adapter` walks and rewrites the model for every donor, which costs as much as a small forward.
Here the slots ('s0'…) are PEFT LoRA layers injected once over the union of the pool's target modules at the
largest rank; a donor of rank r fills the first r rows of A and columns of B (the rest stay zero, so B·A and
the output are unchanged) and sets each module's scale alpha/r (or alpha/√r for rsLoRA). The slot layout grows
(one rebuild) when a donor needs a module or a rank the slots lack.

A forward pass whose rows are all slot donors (or the base) runs `segments`: the rows come grouped by donor, the slot
layers are disabled for PEFT, and a forward hook on each adds B·A·x·scale to each donor's rows, sliced as views.
PEFT's mixed-batch path instead builds index lists in Python and copies each donor's rows in and out of every LoRA
layer, once per pass; on the tiny world that was most of a donor's cost beyond its forward (bench/bench_roofline.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open

from engine.core.adapter import WEIGHTS_FILE, ModuleFactors, open_adapter


@dataclass(frozen=True)
class DonorLayout:
    modules: dict[str, ModuleFactors]  # module path → its keys, rank and PEFT scale

    @property
    def suffixes(self) -> set[str]:
        return {m.split(".")[-1] for m in self.modules}

    @property
    def max_rank(self) -> int:
        return max(f.rank for f in self.modules.values())


def read_layout(folder: str | Path, layouts: dict | None = None) -> DonorLayout | None:
    """Ranks and scales per module (PEFT's pattern rules, via engine.core.adapter); None when the donor needs features
    slots don't model (embedding LoRAs, biases, DoRA, saved modules): PEFT loads those itself. `layouts` caches
    parsed headers across donors."""
    adapter = open_adapter(str(folder), folder, layouts)
    if not adapter.plain:
        return None
    return DonorLayout(dict(adapter.modules))


class LoraSlots:
    """`n` slots named s0…s{n-1} over `targets` (module suffixes) at rank `rank`, inside one PeftModel. `group`:
    equal, back-to-back segments get their deltas in batched matmuls (`_add_grouped`), else one per segment."""

    def __init__(self, model, n: int, targets: set[str], rank: int, group: bool = True):
        from peft import LoraConfig, get_peft_model

        self.targets, self.rank, self.group = set(targets), rank, group
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets), lora_dropout=0.0)
        self.names = [f"s{i}" for i in range(n)]
        self._slot_names = frozenset(self.names)
        self.peft = get_peft_model(model, cfg, adapter_name=self.names[0])
        self.layers = {
            name.removeprefix("base_model.model."): mod
            for name, mod in self.peft.named_modules()
            if hasattr(mod, "lora_A") and self.names[0] in mod.lora_A
        }
        # The other slots go straight into the LoRA layers the first injection made, with the call PEFT's own
        # `_create_and_replace` makes for an existing LoRA layer. `add_adapter` would walk the whole model once per
        # slot, and each walk grows with the slots already added: 1 s for 16 slots on a 4-layer model, most of
        # a scorer's start-up (tests/actors: every slot path against an independent PEFT forward).
        # Each new slot takes the dtype PEFT gave the first (its autocast_adapter_dtype keeps adapters in float32).
        for name in self.names[1:]:
            self.peft.peft_config[name] = cfg
            for key, layer in self.layers.items():
                layer.update_layer(name, rank, lora_alpha=rank, target_name=key, config=cfg)
                dtype = layer.lora_A[self.names[0]].weight.dtype
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
        self.peft.eval()
        self.free = list(reversed(self.names))
        self.owner: dict[str, str] = {}
        self._zero_all()
        self._segments: list[tuple[str, int, int]] = []
        self._grouped: tuple[int, int] | None = None  # rows [lo, hi) of equal, back-to-back segments
        self._peft_mode = True  # slot layers enabled for PEFT's own forward (adapter_names or set_adapter)
        for layer in self.layers.values():
            layer.register_forward_hook(self._add_deltas)

    def _add_deltas(self, module, args, output):
        """Each segment's rows get their slot's LoRA delta; inert outside `segments` (PEFT's forward adds its own)."""
        if not self._segments:
            return None
        x = args[0]
        if self._grouped is not None:
            lo, hi = self._grouped
            out = output[lo:hi]
            if out.is_contiguous():
                self._add_grouped(module, x[lo:hi], out)
                return output
        for slot, start, end in self._segments:
            a, b = module.lora_A[slot].weight, module.lora_B[slot].weight
            # (rows, T, r) is small, so the scale goes there; as a BLAS alpha a NaN scale came out finite on CPU
            xa = (x[start:end].to(a.dtype) @ a.t()).mul_(module.scaling[slot])
            out = output[start:end]  # a contiguous view: rows [start, end) of the layer's output
            if b.dtype == out.dtype:  # accumulate in place: no (rows, T, d_out) delta is written and read back
                out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), b.t())
            else:  # float32 slots in a bf16 model: the delta in float32, added in the model's dtype, as PEFT does
                out.add_((xa @ b.t()).to(out.dtype))
        return output

    def _add_grouped(self, module, x: torch.Tensor, out: torch.Tensor) -> None:
        """Every segment at once, when they have equal lengths and lie back to back (a pass of several donors over
        one chunk of the sample): the slots' factors stacked, two batched matmuls per layer instead of two per
        donor, so a pass launches as many kernels whatever its donors. On the CPU tiny world it scored at the
        per-segment loop's speed (bench/bench_roofline.py); it is meant for passes of many donors on a GPU."""
        names = [slot for slot, _, _ in self._segments]
        n = len(names)
        a = torch.stack([module.lora_A[slot].weight for slot in names])  # (n, r, d_in)
        b = torch.stack([module.lora_B[slot].weight for slot in names])  # (n, d_out, r)
        scale = torch.tensor([module.scaling[slot] for slot in names], dtype=a.dtype, device=a.device).view(n, 1, 1)
        xa = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2)).mul_(scale)
        grouped = out.view(n, -1, out.shape[-1])
        if b.dtype == grouped.dtype:
            grouped.baddbmm_(xa, b.transpose(1, 2))
        else:
            grouped.add_(torch.bmm(xa, b.transpose(1, 2)).to(grouped.dtype))

    def is_slot(self, name: str) -> bool:
        return name in self._slot_names

    @contextlib.contextmanager
    def segments(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block the next forward gives row i the delta of slot `names[i]` (None: the base alone). Rows of
        one slot must be consecutive, so each donor's rows are one slice of the batch."""
        segs: list[tuple[str, int, int]] = []
        for i, name in enumerate(names):
            if segs and segs[-1][0] == name and segs[-1][2] == i:
                segs[-1] = (name, segs[-1][1], i + 1)
            else:
                segs.append((name, i, i + 1))
        slots = [seg for seg in segs if seg[0] is not None]
        if len({seg[0] for seg in slots}) != len(slots):
            raise RuntimeError("segments: each slot's rows must be consecutive in the batch")
        if self._peft_mode:
            if any(a not in self._slot_names for a in self.peft.active_adapters):
                self.peft.set_adapter(self.names[0])  # a PEFT-loaded donor must not apply to these rows
            for layer in self.layers.values():
                layer.enable_adapters(False)
            self._peft_mode = False
        self._segments = slots
        lengths = {end - start for _, start, end in slots}
        back_to_back = all(prev[2] == nxt[1] for prev, nxt in zip(slots, slots[1:]))
        self._grouped = (slots[0][1], slots[-1][2]) if self.group and len(slots) > 1 and len(lengths) == 1 \
            and back_to_back else None
        try:
            yield
        finally:
            self._segments = []
            self._grouped = None

    def peft_mode(self) -> None:
        """Give the slot layers back to PEFT's own forward (a pass that holds a donor PEFT loaded itself)."""
        if not self._peft_mode:
            for layer in self.layers.values():
                layer.enable_adapters(True)
            self._peft_mode = True

    def _zero_all(self) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                for name in self.names:
                    layer.lora_A[name].weight.zero_()
                    layer.lora_B[name].weight.zero_()

    def fits(self, layout: DonorLayout) -> bool:
        return layout.suffixes <= self.targets and layout.max_rank <= self.rank and set(layout.modules) <= set(self.layers)

    @torch.no_grad()
    def load(self, key: str, folder: str | Path, layout: DonorLayout, tensors: dict | None = None) -> str:
        """Copy a donor into a free slot, from `tensors` when the caller already read them, else from the file.
        Every module of the donor must have a slot layer: a module the slots lack is an error (the caller rebuilds
        or falls back to PEFT), never a silently missing part of its ΔW."""
        missing = sorted(set(layout.modules) - set(self.layers))
        if missing or layout.max_rank > self.rank:
            raise RuntimeError(f"the LoRA slots do not cover this donor (modules {missing[:3]}, rank "
                               f"{layout.max_rank} vs {self.rank})")
        if not self.free:
            raise RuntimeError("no free LoRA slot (the LRU should have evicted one)")
        slot = self.free.pop()
        # Two fused calls for the whole donor, not four small ops per module: zero what the donor leaves (a module
        # it lacks, the rows past a lower rank), then copy every factor in.
        zeros, dsts, srcs = [], [], []
        with _tensor_source(folder, tensors) as f:
            for module, layer in self.layers.items():
                a, b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                factors = layout.modules.get(module)
                if factors is None or factors.rank < self.rank:
                    zeros += [a, b]
                if factors is not None:
                    r = factors.rank
                    dsts += [a, b] if r == self.rank else [a[:r], b[:, :r]]
                    srcs += [f.get_tensor(factors.a_key), f.get_tensor(factors.b_key)]
                    layer.scaling[slot] = factors.scale
            if zeros:
                torch._foreach_zero_(zeros)
            if dsts:
                torch._foreach_copy_(dsts, srcs)
        self.owner[key] = slot
        return slot

    def release(self, key: str) -> None:
        self.free.append(self.owner.pop(key))

    def unload(self):
        """Remove every slot and give back the plain base model (for a rebuild with a bigger layout)."""
        return self.peft.unload()


class _Preloaded:
    def __init__(self, tensors: dict):
        self.get_tensor = tensors.__getitem__


@contextlib.contextmanager
def _tensor_source(folder: str | Path, tensors: dict | None):
    """Something with `get_tensor(key)`: the tensors already read, or the safetensors file opened lazily."""
    if tensors is not None:
        yield _Preloaded(tensors)
        return
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
        yield f
