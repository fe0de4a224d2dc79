# The two set-up commands of the README: `make run` and `make test`; and `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# Passed to `python -m bench`: figures and options, e.g. make bench ARGS="m1 --quick".
ARGS ?=

.PHONY: run test lint typecheck pytest tools clean bench model soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The dev set plus the bench extra (matplotlib); a stamp of its own, so that
# `make test` never needs it and `make bench` reinstalls only when it changes.
$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## run: start Tidings in dev mode (no authentication) on the embedded in-memory store
run: $(STAMP)
	TIDINGS_DEV=1 $(BIN)/tidings serve

## test: lint, type-check and run the whole test suite with its coverage floor
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) tools
	$(BIN)/pytest --cov --cov-report=term-missing

# Debian's promtool checks the alert rules' PromQL (tests/test_monitoring.py). It is
# installed where it can be (as root, through apt-get). The package brings the Prometheus
# server too; with no init system here it is not started. Debian's Chromium, installed the
# same way, is the browser that Playwright drives at /usr/bin/chromium in the web console's
# test (tests/test_e2e_console.py); Playwright never downloads a browser of its own.
# Where they cannot be installed, install them yourself: their tests skip, and a skip for
# that reason fails the run (tests/skips.py, docs/reliability.md#skips).
tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && \
		    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }; }; } || \
		echo "promtool not installed: tests/test_monitoring.py skips its PromQL check, and the run fails"
	@[ -x /usr/bin/chromium ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && \
		    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "chromium not installed: tests/test_e2e_console.py skips its browser tests, and the run fails"

## bench: start Tidings, the baselines and nx-27017 on 127.0.0.1, measure every figure
## (7 to 16 minutes, a progress line every 15 s), write bench/results/*.json,
## docs/benchmarks.md and docs/latency.png
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(ARGS)

## soak: steady load and connection churn on nx-27017 for 10 minutes (ARGS="--minutes 30"),
## a progress line every 30 s: nothing lost, RSS and descriptors flat; writes
## bench/results/soak.json (with its run id and commit) and docs/soak.png
soak: $(BENCH_STAMP)
	$(BIN)/python -m bench.soak $(ARGS)

## model: the model-based protocol test for long (300 examples of 40 steps on each store;
## TIDINGS_MODEL_EXAMPLES and TIDINGS_MODEL_STEPS to change); make test runs a short one
model: $(STAMP)
	TIDINGS_MODEL_EXAMPLES=$${TIDINGS_MODEL_EXAMPLES:-300} TIDINGS_MODEL_STEPS=$${TIDINGS_MODEL_STEPS:-40} \
		$(BIN)/pytest -p no:cacheprovider tests/test_model_based.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage build src/*.egg-info
