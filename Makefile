# ztgateway developer commands. `make run` and `make test` do all set-up on a fresh machine.
#
# Every environment installs from the committed lock files in requirements/ (exact versions,
# sha256 hashes), never from whatever a registry serves today:
#   requirements/runtime.txt  the gateway and its build backend   (`make run`)
#   requirements/dev.txt      the above + tests, lint, lock tools  (`make test`, CI)
# `make lock` regenerates both from pyproject.toml; see "Dependencies" in the README.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
CONFIG ?= config/gateway.toml
# pip only: --require-hashes refuses anything not in the lock; the project itself is installed
# without its dependencies (they came from the lock) and without build isolation (the build
# backend came from the lock too), so nothing is resolved against the registry.
PIP_LOCKED := $(BIN)/pip install -q --require-hashes --no-deps
PIP_SELF := $(BIN)/pip install -q --no-deps --no-build-isolation -e .
# Locking asks the public registry only (no machine-local wheel folders or mirrors), so the lock
# names files every machine can fetch and their hashes.
LOCK_ENV := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --all-build-deps \
	--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),$(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))))

.PHONY: venv dev-venv run test test-future lint fmt bench soak certs lock clean screenshots

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(RUNTIME_STAMP): requirements/runtime.txt pyproject.toml | $(BIN)/python
	$(PIP_LOCKED) -r requirements/runtime.txt
	$(PIP_SELF)
	touch $@

$(DEV_STAMP): requirements/dev.txt pyproject.toml | $(BIN)/python
	$(PIP_LOCKED) -r requirements/dev.txt
	$(PIP_SELF)
	touch $@ $(RUNTIME_STAMP)

venv: $(RUNTIME_STAMP)
dev-venv: $(DEV_STAMP)

# The dev PKI is made once and renewed whenever a certificate is expired or close to expiry,
# so the demo still starts a year from now.
certs: $(RUNTIME_STAMP)
	$(BIN)/ztgateway certs init --dir certs --renew

# Ports: from $(CONFIG), moved one by one (make run GATEWAY_PORT=18443 OPS_PORT=19100
# APP_PORT=18080 IDP_PORT=19200) or all at once (make run PORT_OFFSET=10000, or ZTGW_PORT_OFFSET
# in the environment); the demo app, the dev IdP, its redirect URIs and the hints follow.
RUN_PORTS := $(if $(GATEWAY_PORT),--gateway-port $(GATEWAY_PORT)) $(if $(OPS_PORT),--ops-port $(OPS_PORT)) \
	$(if $(APP_PORT),--app-port $(APP_PORT)) $(if $(IDP_PORT),--idp-port $(IDP_PORT)) \
	$(if $(PORT_OFFSET),--port-offset $(PORT_OFFSET))
run: certs
	$(BIN)/python -m ztgateway.dev.run -c $(CONFIG) $(RUN_PORTS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check ztgateway tests $(wildcard bench) scripts
	$(BIN)/ruff format --check ztgateway tests $(wildcard bench) scripts
	$(BIN)/mypy

fmt: $(DEV_STAMP)
	$(BIN)/ruff format ztgateway tests $(wildcard bench) scripts
	$(BIN)/ruff check --fix ztgateway tests $(wildcard bench) scripts

test: lint
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory test-future

# The suite's time-dependent tests again, with the whole process (OpenSSL included) 400 days in
# the future under libfaketime: a certificate, token or report made "now" with a fixed lifetime,
# or a fixed date compared with something made now, fails here long before it fails in CI.
FUTURE ?= +400d
test-future: $(DEV_STAMP)
	tests/run_future.sh $(FUTURE)

# Every page a person meets, photographed in Debian's Chromium (Playwright) from the real demo
# started in a scratch copy of the checkout: docs/screenshots/*.png (docs/portal.md).
screenshots: $(DEV_STAMP) certs
	$(BIN)/python scripts/screenshots.py

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Ten minutes on Redis with workers = 2 at 200 req/s plus connection churn; prints requests,
# errors, RSS growth, fds and audit completeness (bench/soak.py). Not part of `make test`.
# A shorter run: make soak SOAK_ARGS="--duration 120".
soak: $(DEV_STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# Regenerate both lock files from pyproject.toml, keeping every pin that still satisfies it.
# `make lock UPGRADE=aiohttp` moves one package (and what it needs) to its newest release;
# `make lock UPGRADE=all` moves everything.
lock: $(DEV_STAMP)
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) -o requirements/runtime.txt pyproject.toml
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) --extra dev -c requirements/runtime.txt -o requirements/dev.txt pyproject.toml

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache var
