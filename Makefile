# One-command set-up: `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	./scripts/ensure-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(PY) -m sogni_client.localnet --images 8 --out out

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sogni_protocol sogni_net sogni_chain sogni_node sogni_coordinator sogni_client

clean:
	rm -rf out .cache .pytest_cache .mypy_cache .ruff_cache
