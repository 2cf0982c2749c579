"""LoRA slots, after vLLM's LoRA manager: inject N PEFT adapters once, then load a donor by copying its tensors.

PEFT's `load_adapter` walks and rewrites the model for every donor, which costs as much as a small forward.
Here the slots ('s0'…) are PEFT LoRA layers injected once over the union of the pool's target modules at the
largest rank; a donor of rank r fills the first r rows of A and columns of B (the rest stay zero, so B·A and
the output are unchanged) and sets each module's scale alpha/r (or alpha/√r for rsLoRA). The slot layout grows
(one rebuild) when a donor needs a module or a rank the slots lack.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def read_layout(folder: str | Path) -> DonorLayout | None:
    """Ranks and scales per module (PEFT's pattern rules, via engine.core.adapter); None when the donor needs features
    slots don't model (embedding LoRAs, biases, DoRA, saved modules): PEFT loads those itself."""
    adapter = open_adapter(str(folder), folder)
    if not adapter.plain:
        return None
    return DonorLayout(dict(adapter.modules))


class LoraSlots:
    """`n` slots named s0…s{n-1} over `targets` (module suffixes) at rank `rank`, inside one PeftModel."""

    def __init__(self, model, n: int, targets: set[str], rank: int):
        from peft import LoraConfig, get_peft_model

        self.targets, self.rank = set(targets), rank
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets), lora_dropout=0.0)
        self.names = [f"s{i}" for i in range(n)]
        self.peft = get_peft_model(model, cfg, adapter_name=self.names[0])
        for name in self.names[1:]:
            self.peft.add_adapter(name, cfg)
        self.peft.eval()
        self.layers = {
            name.removeprefix("base_model.model."): mod
            for name, mod in self.peft.named_modules()
            if hasattr(mod, "lora_A") and self.names[0] in mod.lora_A
        }
        self.free = list(reversed(self.names))
        self.owner: dict[str, str] = {}
        self._zero_all()

    def _zero_all(self) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                for name in self.names:
                    layer.lora_A[name].weight.zero_()
                    layer.lora_B[name].weight.zero_()

    def fits(self, layout: DonorLayout) -> bool:
        return layout.suffixes <= self.targets and layout.max_rank <= self.rank and set(layout.modules) <= set(self.layers)

    @torch.no_grad()
    def load(self, key: str, folder: str | Path, layout: DonorLayout) -> str:
        """Copy a donor into a free slot. Every module of the donor must have a slot layer: a module the slots
        lack is an error (the caller rebuilds or falls back to PEFT), never a silently missing part of its ΔW."""
        missing = sorted(set(layout.modules) - set(self.layers))
        if missing or layout.max_rank > self.rank:
            raise RuntimeError(f"the LoRA slots do not cover this donor (modules {missing[:3]}, rank "
                               f"{layout.max_rank} vs {self.rank})")
        if not self.free:
            raise RuntimeError("no free LoRA slot (the LRU should have evicted one)")
        slot = self.free.pop()
        with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
            for module, layer in self.layers.items():
                a, b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                a.zero_()
                b.zero_()
                factors = layout.modules.get(module)
                if factors is not None:
                    r = factors.rank
                    a[:r].copy_(f.get_tensor(factors.a_key))
                    b[:, :r].copy_(f.get_tensor(factors.b_key))
                    layer.scaling[slot] = factors.scale
        self.owner[key] = slot
        return slot

    def release(self, key: str) -> None:
        self.free.append(self.owner.pop(key))

    def unload(self):
        """Remove every slot and give back the plain base model (for a rebuild with a bigger layout)."""
        return self.peft.unload()
