# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, so that a machine without a GPU does not pull several GB of CUDA libraries: PyPI's
# torch for Linux is the CUDA build, the CPU one (2.13.0+cpu, which meets the pin) comes from PyTorch's own
# index, torch alone (its dependencies then from PyPI). Our machines hold it as a local wheel, and there
# that index does not answer: pip retries it for a few seconds, then takes the local one.
TORCH_CPU := torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Every other package of the venv at the release the suite last passed with (constraints.txt; pyproject.toml
# keeps ranges): the tests compare our models with transformers' classes and drive the official openai client,
# the Triton interpreter and schemathesis, and new releases have broken the suite (transformers 5.25's kernels
# package). `make lock` writes the file again from the newest releases the ranges allow; run the tests after it.
CONSTRAINTS ?= -c constraints.txt


.PHONY: venv lock test test-gpu gpu-session gpu-wheels serve bench-kernels bench-generate bench-serve quality quality-llama-cpp clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps $(TORCH_CPU) --index-url $(TORCH_INDEX)
	$(BIN)/pip install -q $(CONSTRAINTS) $(TORCH_CPU) -e '.[triton,server,demo,dev]'
	touch $@

# constraints.txt from a venv of the newest releases pyproject.toml allows (torch stays TORCH_CPU).
lock:
	rm -rf .lock-venv
	$(MAKE) --no-print-directory venv VENV=.lock-venv CONSTRAINTS=
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

# One xdist worker per core (at most 8), each with one OpenMP thread (tests/conftest.py): the suite is mostly
# the Triton interpreter and tiny models, one Python thread each.
test: venv
	$(BIN)/python -m pytest -q --numprocesses=auto --maxprocesses=8 tests

# On a CUDA machine with torch and triton already installed (no venv): compiled kernels and GPU paths.
# Only the files with GPU tests: the server tests import packages GPU images may lack.
test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q tests/test_elementwise.py tests/test_quantizer.py tests/test_kernels.py tests/test_models.py tests/test_runtime.py tests/test_speculative.py tests/test_kv_groups.py tests/test_attention_window.py -m gpu

# A short GPU lease: kernel builds compiled in parallel, the kernel and 7B generation benchmarks, then the
# GPU tests in parallel, in one call of at most 9 minutes; logs and results in one archive (see
# bench/gpu_session.sh).
gpu-session:
	bash bench/gpu_session.sh

# The server's packages and the client its tests drive, which the GPU image lacks (it reaches no package index), as
# wheels for its Python (3.12, x86-64 Linux) at the releases of constraints.txt, in .wheels/gpu-server: a GPU session
# carries the folder and its test-server-gpu and serve-7b steps unpack them (bench/gpu_session.sh). 6 MB.
GPU_PYTHON ?= 3.12
gpu-wheels: venv
	rm -rf .wheels/gpu-server.part
	$(BIN)/pip download -q --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $(CONSTRAINTS) -d .wheels/gpu-server.part \
		fastapi uvicorn httpx openai
	rm -rf .wheels/gpu-server && mv .wheels/gpu-server.part .wheels/gpu-server

serve: venv
	$(BIN)/lcq serve

bench-kernels:
	PYTHONPATH=. $(PYTHON) bench/kernels.py

bench-generate: venv
	$(BIN)/python bench/generate.py

bench-serve: venv
	$(BIN)/python bench/serve.py

quality: venv
	$(BIN)/python bench/quality.py

# llama.cpp's types on the same model and evaluation (builds llama.cpp's quantize tools, ~6 min on 2 cores)
quality-llama-cpp: venv
	$(BIN)/pip install -q 'sentencepiece>=0.2'
	$(BIN)/python bench/quality_llama_cpp.py

clean:
	rm -rf $(VENV) build *.egg-info
