# Everyday tasks. `make setup` is what the README's commands run first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup php venv test test-slow lint bench clean

setup: php venv

php:
	@command -v php >/dev/null 2>&1 || { \
	  echo "installing php-cli from Debian"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq php-cli >/dev/null; }
	@# iproute2 for the multi-host test (network namespaces); optional, so never fatal
	@command -v ip >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; } \
	  >/dev/null 2>&1 || true

$(BIN)/shardpool: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/shardpool

test: setup
	$(BIN)/pytest -q

# The long tests (fault soak runs) left out of the default suite; CI runs them too.
test-slow: setup
	$(BIN)/pytest -q -m slow

lint: venv
	$(BIN)/ruff check shardpool tests bench
	$(BIN)/ruff format --check shardpool tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/shardpool bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis bench/out
