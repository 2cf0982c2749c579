"""GPU validation and figures, without Ray, split by concern; `python -m bench.bench_gpu` is the entry point.

`common` (logging, device helpers, the worlds), `parity`, `throughput`, `finetune`: one module per part.
"""
import os

# Before torch/transformers are imported by any submodule: offline, quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
