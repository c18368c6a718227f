# make demo   - end-to-end pruning-aware pretraining demo on CPU (sets everything up first)
# make test   - the test suite (sets everything up first)
# make llama-cpp - build llama.cpp once from the llama-cpp-python sdist, cached in ~/.cache/efficientllm/
#                (opt-in; ~3 minutes on 2 cores; the GGUF tests and bench/gguf_speed.py build it if missing)
# make corpus-debian-docs - the ~30 M-token corpus from Debian's documentation packages (opt-in:
#                downloads ~300 MB of .deb files with apt-get download; nothing is installed)
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export TORCHDYNAMO_DISABLE := 1

.PHONY: setup demo test test-fast bench clean corpus-debian-docs llama-cpp

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

llama-cpp: setup
	$(PY) tools/build_llama_cpp.py

corpus-debian-docs: setup
	$(PY) -m data_prep.build_corpus --source debian-docs --fetch-packages \
	    --output data/debian_docs.jsonl --min-total-chars 100000000 \
	    --holdout-fraction 0.01 --holdout-output data/debian_docs_held_out.jsonl

clean:
	rm -rf demo_out .pytest_cache
