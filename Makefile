# onnx-dc developer entry points. `make demo` and `make test` set up a fresh
# Debian machine themselves (scripts/setup.sh) before running.
PYTHON ?= python3

.PHONY: setup demo test bench fuzz

FUZZ_SECONDS ?= 60

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m model_zoo.demo

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/run_all.py

fuzz: setup
	PYTHON=$(PYTHON) bash fuzz/run.sh all $(FUZZ_SECONDS)
