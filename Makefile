# Two commands a newcomer needs: `make run` and `make test`. Both create the
# virtualenv and build the Cython extension when they are missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
WORKERS ?=
ARGS ?=

.PHONY: run test check lint typecheck bench dev clean debian-deps

$(STAMP): pyproject.toml setup.py _native/_ledger.pyx _native/_atomic.h _native/_relay.pyx _native/_framing.pyx _native/_pump.pyx _native/_chunk.pxd
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -c "import zaiproxy._native._ledger, zaiproxy._native._relay, zaiproxy._native._framing, zaiproxy._native._pump"  # fail here, not at start-up, if the build broke
	touch $(STAMP)

dev: $(STAMP)

# Starts the proxy. Without ZAI_API_KEY it runs against the built-in mock upstream.
run: $(STAMP)
	@if [ -z "$$ZAI_API_KEY" ]; then \
	  exec $(BIN)/zaiproxy serve --demo --host $(HOST) --port $(PORT) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS); \
	else \
	  exec $(BIN)/zaiproxy serve --host $(HOST) --port $(PORT) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS); \
	fi

# Debian packages the tests use: prometheus + promtool (alert rule tests, canary-check against
# a real Prometheus) and redis-server + redis-tools (the fleet limits: tests start their own
# server on a free port). Installed once when missing (the packages' services are not used).
debian-deps:
	@missing=""; \
	command -v promtool >/dev/null && command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v redis-server >/dev/null && command -v redis-cli >/dev/null || missing="$$missing redis-server redis-tools"; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The whole suite: lint, types, import contracts, tests (against both HTTP implementations,
# see zaiproxy/http/http11.py). CI runs exactly this (.ci/run).
test: $(STAMP) debian-deps
	$(BIN)/ruff check zaiproxy _native tui tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q
	ZAIPROXY_HTTP_IMPL=h11-mypyc $(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/ruff check zaiproxy _native tui tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# The bench suite (bench/README.md): the mock directly, zaiproxy and nginx; ~6 minutes. It talks
# to the proxy over HTTP only (bench/micro/ holds the in-process micro-benchmarks).
# Debian keeps nginx in /usr/sbin, often not on a user's PATH; gcc builds bench/loadgen.
bench: $(STAMP)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { apt-get update -qq && apt-get install -y -qq nginx; }
	$(BIN)/python -m bench.suite $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _native/*.so _native/*.c
