# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel where there is no NVIDIA driver; the default (CUDA) build where there is one.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
EXTRAS ?= dev,demo,kernels,lora
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test test-slow lint typecheck pytest proto bench clean env-imagereward env-hpsv2 env-vlm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/sana-rl run recipes/tiny.yaml

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy orchestrator actors rewards policy kernels bench

# --durations: where the suite's time goes shows in every CI log (Ray-backed integration tests dominate)
pytest: $(STAMP)
	$(BIN)/pytest -q --durations=15

# The full demo as shipped, asserting its gains (about 7 minutes on an AVX-512 2-core machine, 17 on an
# AVX2 one); CI runs it after `make test`.
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow tests/integration/test_demo.py

proto: $(STAMP)
	bash scripts/gen_proto.sh

bench: $(STAMP)
	$(BIN)/sana-rl bench --out bench/out/results.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache

# Reference / serving environments for scorers whose upstream packages conflict with the main one.
# A recipe's `python: .venv-<name>/bin/python` runs that reward's RewardHost in one, so each env keeps the
# main env's Python minor and Ray version (ray==2.60.*): Ray's worker protocol is not stable across them.
# hpsv2 / imagereward: about 6 GB each (PyPI's CUDA torch, which also runs on CPU); vlm: a GPU machine.
env-hpsv2:
	$(PYTHON) -m venv .venv-hpsv2
	.venv-hpsv2/bin/pip install -r scripts/envs/hpsv2.txt
	.venv-hpsv2/bin/pip install --no-deps hpsv2x==1.2.0
	.venv-hpsv2/bin/pip install --no-deps -e .

env-imagereward:
	$(PYTHON) -m venv .venv-imagereward
	.venv-imagereward/bin/pip install -r scripts/envs/imagereward.txt
	.venv-imagereward/bin/pip install --no-deps -e .

env-vlm:
	$(PYTHON) -m venv .venv-vlm
	.venv-vlm/bin/pip install -r scripts/envs/vlm.txt
	.venv-vlm/bin/pip install --no-deps -e .
