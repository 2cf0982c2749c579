"""The finetune stage's configuration: one model for both executors, so that a merged-init run and its scratch
baseline differ only in `init`, and a DeepSpeed run and a single-process run only in `executor`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.core.config import StrictModel


class LoraSettings(StrictModel):
    """The fresh LoRA of a scratch run. With an `init` adapter its own r/alpha/target_modules are kept instead."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="applied to scratch and init adapters alike")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class DeepSpeedSettings(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process per worker)")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; otherwise CPU and gloo")
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="3 partitions the parameters too: each worker loads the "
                                                        "base into host memory once, then holds 1/N of it")
    max_failures: int = Field(3, ge=0, description="worker or node losses Ray Train recovers from (from the last state)")
    storage_path: str | None = Field(None, description="where Ray Train keeps the resumable states (default <out>/"
                                                       "ray_train); on several nodes a shared path or s3:// URI")
    placement_strategy: Literal["PACK", "SPREAD"] = Field("PACK", description="SPREAD puts workers on different nodes")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="merged over the generated DeepSpeed config (advanced)"
    )


class FinetuneSettings(StrictModel):
    """How to train: the `finetune:` section of `mashup run`, where the run supplies the rest (base, data, out,
    init, eval and seed); `mashup finetune` takes a FinetuneConfig, which adds them."""

    executor: Literal["single", "deepspeed"] = "single"
    steps: int = Field(100, ge=1, description="optimizer steps (the fixed budget)")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, over all workers")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each worker")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="None disables clipping")

    eval_every: int = Field(0, ge=0, description="0 = only at step 0 and at the end")
    eval_samples: int | None = Field(None, ge=1, description="seeded subset of the eval file")
    eval_batch_tokens: int = Field(8192, ge=64)
    save_every: int = Field(0, ge=0, description="adapter checkpoints every N steps, and the resumable state a killed "
                                                 "run continues from; 0 = final adapter only")

    lora: LoraSettings = Field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    device: str = Field("auto", description="single executor: 'auto' = cuda if available, else cpu")
    dtype: Literal["float32", "bfloat16"] = "float32"
    chat_template: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    ray_address: str | None = Field(None, description="deepspeed executor: Ray cluster (default: RAY_ADDRESS or local)")
    overwrite: bool = Field(False, description="replace a finished or crashed run already in `out`")


class FinetuneConfig(FinetuneSettings):
    base: str = Field(..., description="base model directory (safetensors)")
    data: str = Field(..., description="training JSONL (prompt, completion)")
    out: str = Field(..., description="output directory: adapter/, checkpoints/, log.jsonl, log.parquet")
    init: str | None = Field(None, description="merged PEFT adapter to start from; None or 'none' = fresh LoRA")
    eval: str | None = Field(None, description="held-out JSONL evaluated at step 0, every eval_every steps, and at the end")
    seed: int = 0

    @field_validator("init", "eval", mode="before")
    @classmethod
    def _none_word(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none", "null") else v

    @model_validator(mode="after")
    def _batch_divides(self) -> "FinetuneConfig":
        workers = self.world_size
        if self.batch_size % (self.grad_accum * workers):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum ({self.grad_accum}) x workers ({workers})"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        return self

    @property
    def world_size(self) -> int:
        return self.deepspeed.num_workers if self.executor == "deepspeed" else 1

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward pass on one worker."""
        return self.batch_size // (self.grad_accum * self.world_size)

    def resolved(self) -> "FinetuneConfig":
        """Absolute paths, taken against the driver's cwd: Ray workers run elsewhere and must read the same files."""
        paths = {k: getattr(self, k) for k in ("base", "data", "out", "init", "eval")}
        return self.model_copy(
            update={k: str(Path(v).expanduser().resolve()) for k, v in paths.items() if v is not None}
        )

    def identity(self) -> dict[str, str | None]:
        """What a finished run was trained from, by content: the init adapter's fingerprint, the base's, the data
        files' sha256, and every option that changes training. `mashup run` retrains a run whose identity moved."""
        from engine.core.adapter import fingerprint, sha256_file
        from engine.core.identity import base_fingerprint, key_of

        cfg = self.resolved()
        options = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("progress", "overwrite", "out")}
        for where_it_runs in ("max_failures", "storage_path", "placement_strategy"):  # never change the arithmetic
            options["deepspeed"].pop(where_it_runs)
        files = {k: sha256_file(getattr(cfg, k)) for k in ("data", "eval") if getattr(cfg, k)}
        base = self.base if self.base.startswith("hf://") else base_fingerprint(cfg.base)[1]
        return {"init_fingerprint": fingerprint(cfg.init) if cfg.init else None,
                "config_key": key_of({"options": options, "files": files, "base": base})}

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser().resolve()
