# Every target installs what it needs on first use (CPU torch pinned by constraints-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test eval bench clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

# The embedded default: local Ray, bundled models, gRPC :9000, HTTP :8000 (Ctrl-C stops it).
run: install
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(VENV)/bin/arbitrage serve

eval: install
	$(VENV)/bin/arbitrage models eval --n 300 --seed 1000 --json

bench: install
	$(VENV)/bin/arbitrage bench --n 200 --seed 2000 --out runs/bench --json

test: install
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
