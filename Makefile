# The README's two commands: `make run` (a sample task on the embedded default) and `make test`.
# Both create .venv and install the project (and its test harness) into it on first use, and again when either
# pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint clean

# The test harness is a distribution of its own (tests/harness/pyproject.toml, imported as keruta_harness),
# installed editable next to the project.
$(STAMP): pyproject.toml tests/harness/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]' -e tests/harness
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
	$(VENV)/bin/pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) test-output .pytest_cache .ruff_cache
