"""Every benchmark script starts as the README shows it, from any directory, without tests.

``python3 benchmarks/NAME.py --help`` is run from a temporary directory with
``-X importtime``, which names every module the script imported: the help must print and
no ``tests`` module may be among them (benchmarks never import test code — the test tree
is not installed, and a benchmark must run from a checkout or next to an install).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(
    p for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines ("import time: self | cumulative | name")."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_every_runnable_benchmark_is_checked() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"ksm_steering.py", "tmem_bench.py", "sharing_scaling.py", "protocol_bench.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs_from_elsewhere_without_importing_tests(script: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: "), result.stdout
    modules = imported_modules(result.stderr)
    assert "argparse" in modules  # the parse worked: importtime output was read
    assert sorted(m for m in modules if m == "tests" or m.startswith("tests.")) == []
