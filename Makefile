# make demo   - end-to-end pruning-aware pretraining demo on CPU (sets everything up first)
# make test   - the test suite (sets everything up first)
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TORCHDYNAMO_DISABLE := 1

.PHONY: setup demo test test-fast bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/preprocess.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf demo_out .pytest_cache
