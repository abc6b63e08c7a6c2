# Everything installs itself: `make run` and `make test` work from a clean clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup run check test lint typecheck unit test-packages bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## run the example organism's daemon in the foreground; talk to it with .venv/bin/xml-pipeline send
run: $(STAMP)
	$(BIN)/xml-pipeline run organism.yaml

check: $(STAMP)
	$(BIN)/xml-pipeline check organism.yaml

lint: $(STAMP)
	$(BIN)/ruff check xml_pipeline workers tests benchmarks
	$(BIN)/ruff format --check xml_pipeline workers tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

## the tests start real redis-server processes, call curl and drive a headless chromium; install Debian's
## packages if missing (each entry is command:package)
TEST_COMMANDS := redis-server:redis-server curl:curl chromium:chromium chromedriver:chromium-driver
test-packages:
	@missing=""; for entry in $(TEST_COMMANDS); do command -v $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing: the tests use the real ones"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

unit: $(STAMP) test-packages
	$(BIN)/python -m pytest -n auto

## lint, type-check and run the whole test suite
test: lint typecheck unit

## measure the pump, the pool and the primitives against their floors (a few minutes); valgrind counts the
## instructions redis-server runs per durable conversation (measurement 9, benchmarks.redis_instructions)
bench: $(STAMP) test-packages
	@command -v valgrind >/dev/null 2>&1 || { echo "installing valgrind: measurements 3 and 9 count Redis's instructions"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq valgrind \
		|| echo "valgrind could not be installed: the benchmarks run without counting instructions"; }
	$(BIN)/python -m benchmarks.run --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
