# ztgateway developer commands. `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/gateway.toml

.PHONY: venv run test lint fmt bench certs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

certs/ca.pem: | $(STAMP)
	$(BIN)/ztgateway certs init --dir certs

certs: certs/ca.pem

run: $(STAMP) certs/ca.pem
	$(BIN)/python -m ztgateway.devrun -c $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check ztgateway tests $(wildcard bench)
	$(BIN)/ruff format --check ztgateway tests $(wildcard bench)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format ztgateway tests $(wildcard bench)
	$(BIN)/ruff check --fix ztgateway tests $(wildcard bench)

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache var
