# The two commands of the README: `make demo` and `make test` (both set everything up first).
# The interpreter scripts/setup.sh installed into: the project venv when it made one.
PY = $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

.PHONY: setup setup-all demo test lint check bench

setup:
	scripts/setup.sh

setup-all:
	scripts/setup.sh --all

demo: setup
	$(PY) -m memd.cli demo

lint:
	$(PY) -m ruff check memd tmem sharing hypervisor tests benchmarks
	$(PY) -m mypy

test: setup-all
	$(PY) -m pytest -q tests
	$(MAKE) lint

bench: setup
	$(PY) benchmarks/tmem_bench.py --json
	$(PY) benchmarks/sharing_scaling.py --json
