# onnx-dc developer entry points. `make demo`, `make test` and `make test-full` set up
# a fresh Debian machine themselves (scripts/setup.sh) before running.
PYTHON ?= python3

.PHONY: setup demo test test-full bench fuzz

FUZZ_SECONDS ?= 60

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m model_zoo.demo

# The default suite (tests not marked slow): about 2.5 minutes on a 2-core machine.
test: setup
	$(PYTHON) -m pytest -q

# The full suite, what CI runs (.ci/run): sanitizers, fuzzing, benchmarks at a tiny size,
# long calibration and search runs too. About 13-19 minutes on a 2-core machine.
test-full: setup
	$(PYTHON) -m pytest -q -m "slow or not slow"

bench: setup
	$(PYTHON) benchmarks/run_all.py

fuzz: setup
	PYTHON=$(PYTHON) bash fuzz/run.sh all $(FUZZ_SECONDS)
