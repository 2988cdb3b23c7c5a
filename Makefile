# The two commands of the README: `make demo` and `make test` (both set everything up first).
# The interpreter scripts/setup.sh installs into: the project venv .venv (python3 before setup).
PY = $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

# Where `make install` puts memd (see scripts/install.sh); override on the command line,
# e.g. `make install VENV=/srv/memd`.  Command-line values reach the script through its
# environment; these defaults are passed explicitly.
VENV = /opt/memd
BINDIR = /usr/local/bin
UNITDIR = /etc/systemd/system
DOCDIR = /usr/share/doc/memd
INSTALL_ENV = VENV='$(VENV)' BINDIR='$(BINDIR)' UNITDIR='$(UNITDIR)' DOCDIR='$(DOCDIR)'

.PHONY: setup setup-all demo test lint check bench bench-ksm install uninstall

setup:
	scripts/setup.sh

setup-all:
	scripts/setup.sh --all

demo: setup
	$(PY) -m memd.cli demo

lint:
	$(PY) -m ruff check memd tmem sharing hypervisor tests benchmarks
	$(PY) -m ruff format --check memd tmem sharing hypervisor tests benchmarks
	$(PY) -m mypy

test: setup-all
	$(PY) -m pytest -q tests
	$(MAKE) lint

bench: setup
	$(PY) benchmarks/tmem_bench.py --json
	$(PY) benchmarks/sharing_scaling.py --json

# Needs root, QEMU and a kernel with KSM; boots TCG guests and runs for several minutes.
bench-ksm: setup-all
	$(PY) benchmarks/ksm_steering.py --json

# The host service: its own venv, memd/memd-guest on PATH, the systemd unit (root).
install:
	$(INSTALL_ENV) scripts/install.sh

uninstall:
	$(INSTALL_ENV) scripts/install.sh --uninstall
