"""Independent LoRA arithmetic for the merge tests: plain torch on the safetensors files, and PEFT's own merge."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file


def read_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) in float32, straight from the file."""
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    modules = {key.rsplit(".lora_", 1)[0] for key in tensors}
    return {m: (tensors[f"{m}.lora_A.weight"].float(), tensors[f"{m}.lora_B.weight"].float()) for m in sorted(modules)}


def read_config(adapter: Path) -> dict:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())


def read_scale(adapter: Path) -> float:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def delta_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = s B A of every module of one adapter."""
    scale = read_scale(adapter)
    return {m: scale * b @ a for m, (a, b) in read_factors(adapter).items()}


def exact_delta(donors: Sequence[Path], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ w_i s_i B_i A_i over the union of modules (a donor without a module adds nothing)."""
    total: dict[str, torch.Tensor] = {}
    for donor, weight in zip(donors, weights):
        for module, delta in delta_weights(donor).items():
            total[module] = total.get(module, 0) + weight * delta
    return total


def peft_weighted_adapter(base_dir: Path, donors: Sequence[Path], weights: Sequence[float], combination_type: str,
                          **kwargs) -> tuple[dict[str, torch.Tensor], object]:
    """PEFT's add_weighted_adapter on the same donor files: (saved-format state dict, its LoraConfig)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    names = [f"d{i}" for i in range(len(donors))]
    model = PeftModel.from_pretrained(base, str(donors[0]), adapter_name=names[0])
    for name, donor in zip(names[1:], donors[1:]):
        model.load_adapter(str(donor), adapter_name=name)
    model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type, **kwargs)
    state = get_peft_model_state_dict(model, adapter_name="merged")
    return {k: v.float() for k, v in state.items()}, model.peft_config["merged"]


def factors_of_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = {key.rsplit(".lora_", 1)[0] for key in state}
    return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]) for m in sorted(modules)}


def linear_delta(base_dir: Path, donors: Sequence[Path], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The `linear` merge's ΔW per module by its definition (docs/contracts.md, "Merge semantics"): with each donor's
    scale folded into B, (Σ w_i s_i B_i)(Σ w_i A_i); s_i is PEFT's own per-module scale of donor i (its
    alpha_pattern and rsLoRA applied), and a donor without a module adds zero to both sums. When every s_i is the
    same s this is s (Σ w_i B_i)(Σ w_i A_i), the merge that keeps the donors' scale. Keys as peft_deltas names them."""
    from tests.adapters import peft_scalings

    sum_a: dict[str, torch.Tensor] = {}
    sum_b: dict[str, torch.Tensor] = {}
    for donor, weight in zip(donors, weights):
        scales = peft_scalings(base_dir, donor)
        for key, (a, b) in read_factors(donor).items():
            module = key.removeprefix("base_model.model.")
            sum_a[module] = sum_a.get(module, 0) + weight * a
            sum_b[module] = sum_b.get(module, 0) + weight * scales[module] * b
    return {m: sum_b[m] @ sum_a[m] for m in sum_a}
