"""What both executors share: the model with its trainable LoRA, the data order, the loss, the optimizer and schedule.

Keeping these in one place is what makes the executors agree: the same seed gives the same LoRA init, the same
batches and the same loss on every executor and world size.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from engine.core.losses import completion_stats, left_pad, model_inputs
from engine.core.data import Encoded, Example, encode_sample, load_jsonl, sample_examples
from engine.core.errors import ConfigError, DataError
from engine.evaluate import EvalResult, evaluate, pad_token_id
from engine.finetune.config import FinetuneConfig

TORCH_EXTENSIONS_DEFAULT = "~/.cache/mashup/torch_extensions"


def deepspeed_env(use_gpu: bool) -> dict[str, str]:
    """Env vars to set before `import deepspeed`, in the driver and in every worker.

    A stable TORCH_EXTENSIONS_DIR makes DeepSpeed JIT-compile its CPU comm op (100-200 s) once per machine.
    """
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser(TORCH_EXTENSIONS_DEFAULT))}
    if not use_gpu:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    return env


def apply_deepspeed_env(use_gpu: bool) -> None:
    """setdefault, so that a user's own TORCH_EXTENSIONS_DIR or DS_ACCELERATOR always wins."""
    for key, value in deepspeed_env(use_gpu).items():
        os.environ.setdefault(key, value)


@dataclass
class TaskData:
    train: list[Encoded]
    eval: list[Example] | None


def load_task(cfg: FinetuneConfig, tokenizer: Any, max_length: int | None) -> TaskData:
    """Read and encode everything before the model trains, so a bad example fails in seconds, not mid-run."""
    train = encode_sample(
        tokenizer, load_jsonl(cfg.data), max_length=max_length, chat_template=cfg.chat_template, source=cfg.data
    ).examples
    held_out = None
    if cfg.eval:
        held_out = sample_examples(load_jsonl(cfg.eval), cfg.eval_samples, cfg.seed)
        encode_sample(tokenizer, held_out, max_length=max_length, chat_template=cfg.chat_template, source=cfg.eval)
    return TaskData(train, held_out)


def load_tokenizer(cfg: FinetuneConfig) -> Any:
    """The base's own tokenizer: the tokenization contract (docs/contracts.md, "Task data") must match scoring's."""
    from transformers import AutoTokenizer

    if not Path(cfg.base).is_dir():
        raise ConfigError(f"base: not a directory: {cfg.base}")
    return AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)


def build_model(cfg: FinetuneConfig, dtype: torch.dtype = torch.float32) -> Any:
    """The base with one trainable LoRA: the `init` adapter (trained further, as the paper does) or a fresh one.

    Seeded, so a fresh LoRA's A matrices are the same on every worker (its B starts at zero).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(
        cfg.base, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
    )
    if cfg.init is None:
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    else:
        init = check_init_dir(cfg.init)
        lora = LoraConfig.from_pretrained(str(init))
        lora.lora_dropout = cfg.lora.dropout
        model = PeftModel.from_pretrained(base, str(init), config=lora, is_trainable=True)
    model.train()
    return model


def check_init_dir(path: str) -> Path:
    """Checked in the driver before any worker starts; safetensors only, so loading never unpickles."""
    init = Path(path)
    if not (init / "adapter_config.json").is_file():
        raise ConfigError(f"init: {init} is not a PEFT adapter directory (no adapter_config.json)")
    weights = init / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"init: {init} has no adapter_model.safetensors (only safetensors weights are loaded)")
    from engine.core.adapter import DORA_UNSUPPORTED, read_config

    if read_config(str(init), init).raw.get("use_dora"):
        raise ConfigError(f"init: {init}: {DORA_UNSUPPORTED}")
    verify_merge_checksum(init, weights)
    return init


def verify_merge_checksum(init: Path, weights: Path) -> None:
    """A merged adapter records its own sha256 (merge_info.json); a file changed or cut short since is refused.

    Adapters without merge_info.json (trained elsewhere) or without the field (older merges) are not checked.
    """
    import json

    from engine.core.adapter import sha256_file

    info_path = init / "merge_info.json"
    if not info_path.is_file():
        return
    try:
        expected = json.loads(info_path.read_text()).get("adapter_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"init: {info_path} is corrupt (not a JSON object); re-run the merge") from None
    if expected is not None and sha256_file(weights) != expected:
        raise ConfigError(f"init: {weights} does not match the adapter_sha256 in {info_path.name} "
                          "(modified or partly written since the merge); re-run the merge")


def max_length_of(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class BatchPlan:
    """Which examples each optimizer step sees: seeded permutations, epoch after epoch.

    A step's global batch is split into world_size x grad_accum micro-batches; because the loss is normalized by
    the global batch's token count, the objective does not depend on the split.
    """

    def __init__(self, examples: Sequence[Encoded], cfg: FinetuneConfig):
        self.examples = examples
        self.batch_size = cfg.batch_size
        self.grad_accum = cfg.grad_accum
        self.world_size = cfg.world_size
        self.seed = cfg.seed
        self._order: list[int] = []

    def global_batch(self, step: int) -> list[int]:
        """Indices for optimizer step `step` (1-based)."""
        end = step * self.batch_size
        epoch = len(self._order) // len(self.examples)
        while len(self._order) < end:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order.extend(torch.randperm(len(self.examples), generator=gen).tolist())
            epoch += 1
        return self._order[end - self.batch_size:end]

    def micro_batches(self, step: int, rank: int) -> tuple[list[list[Encoded]], int]:
        """This rank's micro-batches for `step`, and the global batch's completion-token count."""
        idx = self.global_batch(step)
        n_tokens = sum(self.examples[i].n_completion for i in idx)
        mb = len(idx) // (self.world_size * self.grad_accum)
        start = rank * self.grad_accum * mb
        micro = [
            [self.examples[i] for i in idx[start + j * mb: start + (j + 1) * mb]] for j in range(self.grad_accum)
        ]
        return micro, n_tokens


def micro_batch_loss(
    model: Any, rows: Sequence[Encoded], n_tokens_global: int, world_size: int, grad_accum: int, pad_id: int
) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate, this micro-batch's NLL sum).

    The loss is scaled by grad_accum x world_size because DeepSpeed (and the single executor, which mimics it)
    divides by grad_accum and averages gradients over workers; the result is the gradient of the global batch's
    token-weighted mean NLL.
    """
    device = next(model.parameters()).device
    batch = left_pad(rows, pad_id, device)
    logits = model(**model_inputs(batch)).logits
    nll, _, _ = completion_stats(logits, batch)
    nll_sum = nll.sum()
    loss = nll_sum * (world_size * grad_accum / n_tokens_global)
    return loss.float(), float(nll_sum.detach())


def make_optimizer(cfg: FinetuneConfig, model: Any) -> tuple[torch.optim.Optimizer, Any]:
    """torch AdamW for both executors (DeepSpeed ZeRO wraps it), so their updates are the same arithmetic."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (does the LoRA target any module of the base?)")
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    return optimizer, scheduler


def evaluate_shard(
    cfg: FinetuneConfig, model: Any, tokenizer: Any, examples: Sequence[Example], rank: int = 0, world_size: int = 1
) -> EvalResult:
    """This worker's share of the held-out set; the shards' sums add up to the whole."""
    return evaluate(
        model,
        tokenizer,
        list(examples)[rank::world_size],
        batch_tokens=cfg.eval_batch_tokens,
        chat_template=cfg.chat_template,
        pad_id=pad_token_id(tokenizer, model),
    )


def is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise DataError(f"training diverged: loss is {loss} at step {step} (lower lr, or check the data)")


def iter_steps(total: int, show: bool, desc: str = "finetune", start: int = 0) -> Iterator[int]:
    """Steps start+1 .. total (a resumed run starts after its saved step), with a progress bar."""
    from tqdm import tqdm

    yield from tqdm(range(start + 1, total + 1), desc=desc, unit="step", disable=not show, dynamic_ncols=True,
                    initial=start, total=total)
