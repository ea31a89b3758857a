# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh clone.
#
#   make setup      .venv with torch, the package (editable) and the compiled extension
#   make demo       the main job on the embedded synthetic data (CPU, two cores)
#   make test       the test suite (GPU tests skip without a GPU)
#   make test-gpu   the GPU tests only (pytest -m gpu)
#   make bench-cpu  the encoder benchmark on the CPU (JSON under bench/results/; the others: python -m bench.NAME)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Our machines take this build from a local wheel cache; any torch >= 2.11 works.
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.installed
# The TORCH_SPEC the venv was set up with: another one sets it up again (torch reinstalled, extension rebuilt).
SPEC_STAMP := $(VENV)/.torch-spec
ifeq ($(origin TORCH_SPEC),file)  # none given (make test, make demo): the venv's own, not the default's reinstall
TORCH_SPEC := $(or $(shell cat $(SPEC_STAMP) 2>/dev/null),$(TORCH_SPEC))
endif

.PHONY: setup demo test test-gpu bench-cpu clean FORCE

setup: $(STAMP)

$(SPEC_STAMP): FORCE
	@mkdir -p $(VENV)
	@test "$$(cat $@ 2>/dev/null)" = '$(TORCH_SPEC)' || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) $(SPEC_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,dali]"
	touch $@

demo: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m train.pipeline --out runs/demo

test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra

test-gpu: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -ra -m gpu

bench-cpu: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.encoder

clean:
	rm -rf build videoprism/_C*.so *.egg-info
