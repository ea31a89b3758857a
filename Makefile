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
# A recipe that fails leaves no half-written target (the stamp) behind.
.DELETE_ON_ERROR:

setup: $(STAMP)

# Rewritten only when it changes, decided here rather than in a recipe (`make -n` showed a done set-up as redone).
ifneq ($(shell cat $(SPEC_STAMP) 2>/dev/null),$(TORCH_SPEC))
$(SPEC_STAMP): FORCE
endif
$(SPEC_STAMP):
	@mkdir -p $(VENV)
	echo '$(TORCH_SPEC)' > $@

# The stamp holds the venv interpreter's version. What its time cannot show makes it stale too: the extension
# gone (make clean, rm), the interpreter another or gone (the system's Python upgraded under the venv, pyenv's
# removed), torch reinstalled by hand (pip writes install-time mtimes; a torch pulled in by another package).
STAMP_PYTHON = $(BIN)/python -c 'import sys; print(sys.version)'
STALE := $(if $(wildcard videoprism/_C*.so),,FORCE) $(wildcard $(VENV)/lib/python*/site-packages/torch/version.py)
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(shell $(STAMP_PYTHON) 2>/dev/null))
STALE += FORCE
endif
# A venv cut short (Ctrl-C in ensurepip) or whose interpreter changed has no working pip: it is made again, with
# --clear over a venv (its packages are the old interpreter's), which drops the spec stamp: written back.
# The stamp is written last: a set-up cut short anywhere before leaves it stale, and the next make redoes it.
MAKE_VENV = $(PYTHON) -m venv $(if $(wildcard $(VENV)/pyvenv.cfg),--clear) $(VENV)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) $(SPEC_STAMP) $(STALE)
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(MAKE_VENV)
	@test -f $(SPEC_STAMP) || echo '$(TORCH_SPEC)' > $(SPEC_STAMP)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,dali]"
	$(STAMP_PYTHON) > $@

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
