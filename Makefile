# The two commands a new user needs: `make up` (the main job) and `make test` (the suite).
# Both create the virtualenv from the hashed lock file on first use; both are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up test test-loaded test-soak lint unit integration bench bench-routing bench-routing-scenarios tools lock clean

DEVTREE := build/dev/dspex/__init__.py

$(STAMP): requirements.lock pyproject.toml deploy/packaging/hatch_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# the editable install links build/dev/dspex/ (deploy/packaging/hatch_build.py); redo it if
# build/ was removed while the virtualenv stayed
$(DEVTREE): | $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

## up: local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS is set) + topics + DSPex processes
up: $(STAMP) $(DEVTREE)
	$(BIN)/dspex up

## test: lint, type-check, then every unit and integration test against a real broker
test: lint tools
	$(BIN)/pytest --fail-on-skip

## test-loaded: `make test` with two CPU-bound processes beside it (users' CI runners are shared)
test-loaded: $(STAMP) $(DEVTREE)
	@set -e; \
	  for n in 1 2; do $(PYTHON) -c "while True: pass" & echo $$! >> .loaders.pid; done; \
	  trap 'kill $$(cat .loaders.pid) 2>/dev/null; rm -f .loaders.pid' EXIT; \
	  $(MAKE) test

## test-soak: the long fault runs `make test` leaves out (the three-broker kill -9 test)
test-soak: $(STAMP) $(DEVTREE) tools
	$(BIN)/pytest -m soak -s

## tools: system programs the tests drive (Prometheus scrapes the metrics exporter; Playwright
## drives Debian's Chromium through the web dashboard; Playwright never downloads a browser)
TOOLS := prometheus chromium
tools:
	@missing=$$(for t in $(TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "the tests need: sudo apt-get install" $$missing >&2; exit 1; fi; }

## bench: the benchmark suite (JSON report, PNG chart, table) into bench-results/
bench: $(STAMP) $(DEVTREE)
	$(BIN)/python -m tests.bench.run --out bench-results

## bench-routing: learned vs static vs LiteLLM routing on simulated LM backends (bench-results/routing.json)
bench-routing: $(STAMP) $(DEVTREE)
	$(BIN)/python -m tests.bench.routing_run --out bench-results

## bench-routing-scenarios: the routing decision under issue 20's scenarios, simulated clock, 3 runs
bench-routing-scenarios: $(STAMP) $(DEVTREE)
	$(BIN)/python -m tests.bench.routing_decide --runs 3 --out bench-results


lint: $(STAMP) $(DEVTREE)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy tests
	$(BIN)/dspex schemas check

unit: $(STAMP) $(DEVTREE)
	$(BIN)/pytest tests/unit

integration: $(STAMP) $(DEVTREE)
	$(BIN)/pytest --fail-on-skip tests/integration

## lock: re-resolve the whole dependency tree with hashes (after editing pyproject.toml)
lock: $(STAMP)
	$(BIN)/uv pip compile --generate-hashes --python-version 3.11 --extra dev --extra server \
		--custom-compile-command "make lock" pyproject.toml -o requirements.lock

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
