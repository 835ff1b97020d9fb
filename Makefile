# `make test` does everything on a fresh Debian machine: venv, package + test extras,
# redis-server (apt-get, when missing), the server matrix's Redis 8.2 and Valkey 8.1 (fetched
# once into $(SERVERS); a failed fetch fails the run), then ruff, mypy, hadolint and pytest.
# Container tests run when podman is set up (scripts/podman-setup.sh, as .ci/run does) and
# skip otherwise.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVERS ?= $(abspath $(VENV))/servers
PYTEST_ARGS ?=
# The matrix tests refuse to run on fewer servers than the matrix has (tests/conftest.py).
export BACKUPD_TEST_SERVERS := $(SERVERS)

.PHONY: test test-slow test-container lint deps redis servers promtool bench clean

test: deps redis servers promtool lint
	BACKUPD_REQUIRE_MATRIX=1 $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: deps redis servers
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

servers: deps
	sh scripts/fetch-servers.sh $(SERVERS) $(BIN)/python

# promtool (Debian's prometheus package) runs the alert rules' tests (tests/test_dashboards.py).
promtool:
	@command -v promtool >/dev/null || { \
	  echo "promtool is missing: installing the prometheus package with apt-get"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "cannot install it here: run 'sudo apt-get install prometheus' (Debian/Ubuntu)"; exit 1; \
	  fi; }
	@promtool --version | head -n 1

test-container: deps redis servers
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
