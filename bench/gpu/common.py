"""Shared by the GPU bench parts: logging, device sync, memory release, matmul timing, versions, device info, the
two worlds (a small float32 base with three donor families; a big bf16 Llama with r16 donors) and sample encoding."""
from __future__ import annotations

import gc
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def time_matmul(m: int, k: int, n: int, device: str, reps: int = 20) -> dict:
    """Median bf16 (fp32 on CPU) matmul FLOP/s for (m×k)@(k×n), rotating 4 input sets, device-event timed."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sets = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for _ in range(4)]
    for a, b in sets:
        a @ b
    sync(device)
    times = []
    for i in range(reps):
        a, b = sets[i % 4]
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"shape": [m, k, n], "dtype": str(dtype).removeprefix("torch."), "median_s": med,
            "tflops": 2 * m * k * n / med / 1e12, "spread_tflops": [2 * m * k * n / max(times) / 1e12,
                                                                      2 * m * k * n / min(times) / 1e12]}


def versions() -> dict:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cuda": torch.version.cuda}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001
        out["deepspeed"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    for name in ("ray", "vllm"):
        try:
            mod = __import__(name)
            out[name] = mod.__version__
        except Exception:  # noqa: BLE001
            out[name] = "not installed"
    return out


def device_info(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"name": f"cpu ({platform.machine()}, {os.cpu_count()} cores)"}
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "multiprocessors": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def small_world(root: Path, p: dict) -> dict:
    """A small base (float32 on disk), donors of three families, a few-shot task; for parity and finetuning."""
    from transformers import AutoModelForCausalLM

    from bench.world.tiny import build_tiny_llama, train_tokenizer, write_lora_adapter, write_task

    base = root / "base"
    if not (root / "READY").exists():
        shutil.rmtree(root, ignore_errors=True)
        tok = train_tokenizer(base)
        build_tiny_llama(base, tok, hidden_size=p["hidden"], num_layers=p["layers"], num_heads=p["heads"],
                         vocab_size=p["vocab"], max_positions=1024)
        model = AutoModelForCausalLM.from_pretrained(str(base))
        families = [("qv", ("q_proj", "v_proj"), 8), ("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj"), 4),
                    ("mlp", ("gate_proj", "up_proj", "down_proj"), 16)]
        for i in range(6):
            fam, mods, r = families[i % 3]
            write_lora_adapter(base, root / "pool" / f"{fam}{i}", seed=100 + i, r=r, alpha=2 * r, target_modules=mods,
                               init_std=0.1, base_model=model)
        write_task(root / "task.jsonl", p["examples"], seed=0, op="sort", shots=p["shots"])
        (root / "READY").write_text("ok")
    return {"base": base, "pool": sorted((root / "pool").iterdir()), "task": root / "task.jsonl"}


def big_world(root: Path, p: dict, device: str) -> dict:
    """A random Llama built on the device and saved in bf16; r16 q/k/v/o donors: one by PEFT, the rest the same
    keys with other random values (what a pool of real adapters of one recipe looks like to the scorer)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.world.tiny import train_tokenizer, write_lora_adapter, write_task

    base = root / "base"
    if not (root / "READY").exists():
        shutil.rmtree(root, ignore_errors=True)
        tok = train_tokenizer(base)
        cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                          num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                          max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(str(base), safe_serialization=True)
        tok.save_pretrained(str(base))
        first = write_lora_adapter(base, root / "pool" / "d0000", seed=0, r=16, alpha=32,
                                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), init_std=0.02,
                                   base_model=model)
        del model
        free(device)
        template = load_file(str(first / "adapter_model.safetensors"))
        for i in range(1, p["donors"]):
            gen = torch.Generator().manual_seed(i)
            d = root / "pool" / f"d{i:04d}"
            d.mkdir(parents=True)
            shutil.copy(first / "adapter_config.json", d / "adapter_config.json")
            save_file({k: torch.randn(v.shape, generator=gen, dtype=torch.float32) * 0.02 for k, v in template.items()},
                      str(d / "adapter_model.safetensors"))
        write_task(root / "task.jsonl", p["examples"], seed=0, op="sort", shots=p["shots"])
        (root / "READY").write_text("ok")
    return {"base": base, "pool": sorted((root / "pool").iterdir()), "task": root / "task.jsonl"}


def encode(base: Path, task: Path):
    from transformers import AutoTokenizer

    from engine.core.data import encode_sample, load_jsonl

    return encode_sample(AutoTokenizer.from_pretrained(str(base)), load_jsonl(task))
