# The everyday commands (README has the two that matter on a fresh machine).
PYTHON ?= python3

.PHONY: install lint typecheck test bench

install:  ## the sidecar, its test dependencies and the type checker
	$(PYTHON) -m pip install -e '.[test,dev]'

lint:
	$(PYTHON) -m ruff check sidecar tests
	$(PYTHON) -m ruff format --check sidecar tests

typecheck:  ## mypy --strict (pyproject.toml [tool.mypy])
	$(PYTHON) -m mypy sidecar

test:
	$(PYTHON) -m pytest

bench:  ## ~7 minutes; on a quiet machine (docs/performance.md)
	$(PYTHON) -m sidecar bench
