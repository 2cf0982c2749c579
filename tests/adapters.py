"""Test helpers: real PEFT adapters of the kinds Hub users publish (patterns, rsLoRA, layer selectors, renamed keys)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def write_peft_adapter(base_dir: str | Path, out_dir: str | Path, seed: int, init_std: float = 0.2,
                       **lora: Any) -> Path:
    """`get_peft_model` with any LoraConfig options, every LoRA tensor drawn non-zero, then `save_pretrained`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def with_adapter_name_in_keys(src: str | Path, dst: str | Path, name: str = "default") -> Path:
    """A copy whose keys read `...lora_A.<name>.weight`, as some Hub uploads are saved."""
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(str(Path(src) / "adapter_model.safetensors"))
    renamed = {k.replace(".lora_A.weight", f".lora_A.{name}.weight").replace(".lora_B.weight", f".lora_B.{name}.weight"): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    return dst


def peft_scalings(base_dir: str | Path, adapter: str | Path) -> dict[str, float]:
    """PEFT's own per-module scale after loading an adapter: the reference for our pattern rules."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    return {name.removeprefix("base_model.model."): float(mod.scaling["default"])
            for name, mod in model.named_modules() if isinstance(getattr(mod, "scaling", None), dict)
            and "default" in mod.scaling}


def peft_deltas(base_dir: str | Path, adapter: str | Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module as PEFT itself computes it after loading (its scales, its selectors)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter))
    return {name.removeprefix("base_model.model."): mod.get_delta_weight("default").detach().float()
            for name, mod in model.named_modules()
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})}


def peft_reference_loss(base_dir: str | Path, adapter: str | Path | None, sample) -> tuple[float, float]:
    """The independent check for every backend: one `PeftModel.from_pretrained` per donor, one example at a time,
    no padding, full logits. Returns (mean completion NLL in nats, token accuracy)."""
    each = peft_reference_examples(base_dir, adapter, sample)
    n = sum(t for _, _, t in each)
    return sum(nll for nll, _, _ in each) / n, sum(h for _, h, _ in each) / n


def peft_reference_examples(base_dir: str | Path, adapter: str | Path | None, sample) -> list[tuple[float, int, int]]:
    """Per example of `sample`, as `peft_reference_loss` computes them: (completion NLL sum, hits, tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    with torch.no_grad():
        for ex in sample.examples:
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
            sl = slice(ex.n_prompt - 1, None)
            out.append((-logp[sl].double().sum().item(), int((logits.argmax(-1)[sl] == targets[sl]).sum()),
                        ex.n_completion))
    return out


def write_trained_adapter(base_dir: str | Path, out_dir: str | Path, sample, seed: int, steps: int = 30,
                          lr: float = 1e-2) -> Path:
    """A real PEFT LoRA trained (plain torch, full batch) on `sample`'s completion tokens: a donor that really is
    better on that task than random ones, for tests whose ranking must be clear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=QV, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.0
        for ex in sample.examples:
            ids = torch.tensor([ex.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            loss = loss - logp[ex.n_prompt - 1:].sum()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


QV = ["q_proj", "v_proj"]


def hub_style_donors(base_dir: str | Path, root: str | Path) -> dict[str, tuple[Path, Path]]:
    """One donor per Hub-style feature, with different target sets: feature → (folder we use, folder PEFT's
    reference loads: the same, except for adapter-name keys, which PEFT reads from the plain copy)."""
    from safetensors.torch import load_file, save_file

    root = Path(root)
    out: dict[str, tuple[Path, Path]] = {}

    def add(name: str, **lora: Any) -> Path:
        path = write_peft_adapter(base_dir, root / name.replace(" ", "_").replace("/", "_"), seed=len(out) + 1, **lora)
        out[name] = (path, path)
        return path

    add("rsLoRA", r=4, lora_alpha=8, target_modules=QV, use_rslora=True)
    add("rank/alpha patterns", r=8, lora_alpha=16, target_modules=QV + ["down_proj"], use_rslora=True,
        rank_pattern={"v_proj": 4}, alpha_pattern={"mlp": 32, "q_proj": 5})
    add("alpha_pattern", r=4, lora_alpha=8, target_modules=QV + ["o_proj"], alpha_pattern={"o_proj": 2})
    add("layers_to_transform", r=4, lora_alpha=16, target_modules=QV, layers_to_transform=[1])
    add("lora_bias", r=4, lora_alpha=8, target_modules=QV, lora_bias=True)
    plain = add("plain (mlp only)", r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"])
    out["adapter-name keys"] = (with_adapter_name_in_keys(plain, root / "named"), plain)
    bf16 = shutil.copytree(plain, root / "bf16")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(bf16 / "adapter_model.safetensors")).items()},
              str(bf16 / "adapter_model.safetensors"))
    out["bf16 donor"] = (bf16, bf16)
    return out
