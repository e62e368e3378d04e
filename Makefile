# One-command set-up: `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench lint clean contracts contracts-check chain chain-deploy

install: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	./scripts/ensure-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[node,coordinator,dev,coreml,quant]'
	touch $(STAMP)

# npm tools for the chain tests: solc-js, OpenZeppelin, anvil (pinned in contracts/package-lock.json)
NPM_STAMP := contracts/node_modules/.installed
$(NPM_STAMP): contracts/package.json contracts/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is missing (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix contracts --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

# js-libp2p hostile client for the interop test (pinned in interop/package-lock.json)
INTEROP_STAMP := interop/node_modules/.installed
$(INTEROP_STAMP): interop/package.json interop/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is missing (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix interop --no-audit --no-fund --loglevel=error
	touch $(INTEROP_STAMP)

test: install $(NPM_STAMP) $(INTEROP_STAMP)
	$(PY) -m pytest

demo: install
	$(PY) -m sogni_devnet.localnet --images 8 --out out

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sogni_protocol sogni_net sogni_chain sogni_node sogni_coordinator sogni_wallet sogni_app sogni_devnet

contracts: $(NPM_STAMP)
	node contracts/build.mjs

contracts-check: $(NPM_STAMP)
	node contracts/build.mjs --check

chain: install $(NPM_STAMP)
	$(PY) -m sogni_chain anvil --state .cache/anvil-state.json --port 8545

chain-deploy: install
	$(PY) -m sogni_chain deploy --url http://127.0.0.1:8545 --out .cache/addresses.json --reuse

clean:
	rm -rf out .cache .pytest_cache .mypy_cache .ruff_cache
