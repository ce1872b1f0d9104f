# Two commands on a fresh machine:  `make run` (the demo: live captions from real
# speech, no Nextcloud needed) and `make test` (ruff, mypy --strict, pytest).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run serve test lint typecheck pytest install system-deps bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@scripts/install-system-deps.sh

run: install system-deps
	$(BIN)/live-transcription demo

serve: install system-deps
	$(BIN)/live-transcription serve

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install system-deps
	$(BIN)/pytest -q -ra

test: lint typecheck pytest

bench: install system-deps
	$(BIN)/python -m bench.run --out docs/benchmarks.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
