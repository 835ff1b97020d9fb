# `make test` does everything on a fresh Debian machine: venv, package + test extras,
# redis-server (apt-get, when missing), then ruff, mypy, hadolint and pytest. Container tests
# run when podman is set up (scripts/podman-setup.sh, as .ci/run does) and skip otherwise.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test test-slow test-container lint deps redis bench clean

test: deps redis lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: deps redis
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

test-container: deps redis
	bash scripts/podman-setup.sh
	$(BIN)/python -m pytest -q -m "container" tests/container $(PYTEST_ARGS)

lint: deps
	$(BIN)/ruff check backupd tests $(wildcard bench)
	$(BIN)/mypy
	@if [ -f Dockerfile ]; then $(BIN)/hadolint Dockerfile; fi

deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

redis:
	@command -v redis-server >/dev/null || { \
	  echo "redis-server is missing: installing redis-server and redis-tools with apt-get"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools; \
	  else \
	    echo "cannot install it here: run 'sudo apt-get install redis-server redis-tools' (Debian/Ubuntu)"; exit 1; \
	  fi; }
	@redis-server --version

bench: deps redis
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
