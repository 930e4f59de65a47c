# The README's two commands: `make run` (a sample task on the embedded default) and `make test`.
# Both create .venv and install the project into it on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Prefect's server telemetry is off for the demo: on a first start its heartbeat races Prefect's own
# database migration and prints a traceback (harmless, but noise). Override on the command line if wanted.
PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/keruta-prefect run --task-file examples/hello.json

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) test-output .pytest_cache .ruff_cache
