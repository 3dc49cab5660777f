# Every target installs what it needs on first use (CPU torch pinned by constraints-cpu.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test eval clean-venv

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/arbitrage models eval --n 100 --seed 1000

eval: run

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
