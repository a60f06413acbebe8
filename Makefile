# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs what it needs; torch 2.13.0 (CPU) installs from local disk.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardckpt-installed
PYTEST_WORKERS ?= 2
# On a machine whose system Python already has a (CUDA) torch: VENV_FLAGS=--system-site-packages
VENV_FLAGS ?=

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV_FLAGS) $(VENV)

$(STAMP): $(BIN)/python pyproject.toml $(wildcard setup.py) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.py)
	$(BIN)/pip install -q "setuptools>=64" wheel
	# torch first and pinned (an unpinned one would pull a multi-GB CUDA build),
	# unless the venv already sees one.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	# cuda-build: nvcc from PyPI so tests/test_cuda_build.py compiles csrc/cuda/ (docs/GPU.md)
	$(BIN)/pip install -q --no-build-isolation -e ".[test,cuda-build]"
	$(BIN)/python -c "import shardckpt.codec as c; print('shardckpt codec path:', c.active_path())"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -ra tests

bench: setup
	$(BIN)/pip install -q --no-build-isolation -e ".[bench]"
	$(BIN)/python benchmarks/save_load.py --drop-caches --out bench_out/save_load.json
	$(BIN)/python benchmarks/async_stall.py --out bench_out/async_stall.json
	$(BIN)/python benchmarks/codec.py --out bench_out/codec.json

lint: setup
	$(BIN)/ruff check shardckpt tests benchmarks examples scripts

clean:
	rm -rf $(VENV) build *.egg-info shardckpt/*.so
