# One-command set-up: `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test demo demo-cluster bench lint clean contracts contracts-check chain chain-deploy

install: $(STAMP)

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	./scripts/ensure-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[node,coordinator,dev,coreml,quant]'
	# optimum-quanto compiles its int4 CPU kernels on first use: build them now, not mid-render
	$(PY) -c "from sogni_node.render.quantize import build_cpu_kernels; build_cpu_kernels()"
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

# Nosana's own job-definition validator, @nosana/sdk (pinned in deploy/nosana/package-lock.json)
NOSANA_STAMP := deploy/nosana/node_modules/.installed
$(NOSANA_STAMP): deploy/nosana/package.json deploy/nosana/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is missing (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix deploy/nosana --no-audit --no-fund --loglevel=error
	touch $(NOSANA_STAMP)

# Sogni's official SDKs for the gateway tests (tests/gateway/test_official_sdks.py): the Python
# one in its own folder, first on PYTHONPATH when the test runs it (it pins websockets<17, the
# venv has 17; its other requirements are the venv's: `pip check` sees both), the JS one by npm ci.
SDK_PY_DIR   := .cache/sogni-sdk-py
SDK_PY_STAMP := $(SDK_PY_DIR)/.installed
$(SDK_PY_STAMP): tests/gateway/sdk/requirements.txt | $(STAMP)
	rm -rf $(SDK_PY_DIR)
	$(PY) -m pip install -q --no-deps --target $(SDK_PY_DIR) -r tests/gateway/sdk/requirements.txt
	PYTHONPATH=$(SDK_PY_DIR) $(PY) -c "import sogni_client, websockets, httpx, eth_account"
	PYTHONPATH=$(SDK_PY_DIR) $(PY) -m pip check
	touch $(SDK_PY_STAMP)

SDK_JS_STAMP := tests/gateway/sdk/js/node_modules/.installed
$(SDK_JS_STAMP): tests/gateway/sdk/js/package.json tests/gateway/sdk/js/package-lock.json
	@command -v npm >/dev/null || { echo "error: npm is missing (Debian: apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix tests/gateway/sdk/js --no-audit --no-fund --loglevel=error
	touch $(SDK_JS_STAMP)

# A headless browser for the status-page test (Debian's chromium; installed when root)
BROWSER_STAMP := .cache/.browser-checked
$(BROWSER_STAMP): scripts/ensure-browser.sh
	./scripts/ensure-browser.sh
	@mkdir -p .cache && touch $(BROWSER_STAMP)

# The suite in TEST_WORKERS processes (pytest-xdist), one per core of the 2-core reference
# machine: ~31 min serially there. `make test TEST_WORKERS=0` runs it in this process. Tests
# marked `serial` (timing floors) run afterwards, alone.
TEST_WORKERS ?= 2
test: install $(NPM_STAMP) $(INTEROP_STAMP) $(NOSANA_STAMP) $(BROWSER_STAMP) $(SDK_PY_STAMP) $(SDK_JS_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not serial"
	$(PY) -m pytest -m serial

demo: install
	$(PY) -m sogni_devnet.localnet --images 8 --out out

# 3 coordinators on one throwaway PostgreSQL, 4 nodes, one coordinator SIGKILLed mid-run
demo-cluster: install
	$(PY) -m sogni_devnet.demo_cluster --images 24 --out out-cluster

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
	rm -rf out out-cluster .cache .pytest_cache .mypy_cache .ruff_cache

# Partner images and definitions (docs/PARTNERS.md). The images build where a Docker engine
# runs (none runs on the dev machines or CI: tests check the Dockerfiles and the entrypoint).
.PHONY: image-node image-coordinator nosana-validator nosana-check salad-group
DOCKER    ?= docker
IMAGE_TAG ?= 0.1.0
image-node image-coordinator: image-%:
	@$(DOCKER) info >/dev/null 2>&1 || { echo "$@: no Docker engine here; build on a host that runs one (docs/PARTNERS.md)" >&2; exit 1; }
	$(DOCKER) build -f docker/$*.Dockerfile -t sogni-$*:$(IMAGE_TAG) .

nosana-validator: $(NOSANA_STAMP)

nosana-check: $(NOSANA_STAMP)
	node deploy/nosana/validate.mjs deploy/nosana/node-job.json

salad-group: install
	@$(PY) deploy/salad/build.py
