# The two commands a new user needs: `make up` (the main job) and `make test` (the suite).
# Both create the virtualenv from the hashed lock file on first use; both are idempotent.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up test lint unit integration lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

## up: local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS is set) + topics + DSPex processes
up: $(STAMP)
	$(BIN)/dspex up

## test: lint, type-check, then every unit and integration test against a real broker
test: lint
	$(BIN)/pytest --fail-on-skip

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/dspex schemas check

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest --fail-on-skip tests/integration

## lock: re-resolve the whole dependency tree with hashes (after editing pyproject.toml)
lock: $(STAMP)
	$(BIN)/uv pip compile --generate-hashes --python-version 3.11 --extra dev \
		--custom-compile-command "make lock" pyproject.toml -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
