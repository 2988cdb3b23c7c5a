"""Suite-wide guard: tests never touch a production agent's paths.

Before any test module is imported, ``$MEMD_RUN_DIR`` and ``$MEMD_STATE_DIR`` (see
:mod:`memd.paths`) point into a temporary directory, so every agent a test starts — in
process or as a ``memd serve`` subprocess, which inherits the environment — keeps its
control socket, KSM ledger and snapshot there.  The production directories are
fingerprinted at the start of the session and checked at its end: a test that wrote
under /run/memd or /var/lib/memd anyway fails the run.  The host's KSM knobs are checked
the same way: every test that steers KSM (or plays a KSM peer) must put them back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hypervisor import ksm
from memd import paths

_SANDBOX = Path(tempfile.mkdtemp(prefix="memd-tests-"))
os.environ["MEMD_RUN_DIR"] = str(_SANDBOX / "run")
os.environ["MEMD_STATE_DIR"] = str(_SANDBOX / "state")
os.environ["MEMD_NBD_DIR"] = str(_SANDBOX / "nbd")
os.environ.pop("MEMD_SOCKET", None)

PRODUCTION_DIRS = (paths.PRODUCTION_RUN_DIR, paths.PRODUCTION_STATE_DIR, paths.PRODUCTION_NBD_DIR)


def fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root with its (mtime_ns, size): what a write would change."""
    if not root.exists():
        return {}
    out = {str(root): (root.stat().st_mtime_ns, 0)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
    return out


_BEFORE = {str(d): fingerprint(d) for d in PRODUCTION_DIRS}


def _ksm_knobs() -> dict[str, int | str]:
    if not ksm.available():
        return {}
    knobs = ksm.snapshot()
    if knobs.get("advisor_mode") == "scan-time":
        knobs.pop("pages_to_scan", None)  # the kernel's advisor moves it by itself
    return knobs


_KSM_BEFORE = _ksm_knobs()


def ksm_changes() -> list[str]:
    """KSM knobs whose value differs from the session's start, as "knob: before -> now"."""
    now = _ksm_knobs()
    return [
        f"{k}: {_KSM_BEFORE.get(k)} -> {now.get(k)}"
        for k in sorted(_KSM_BEFORE.keys() | now.keys())
        if _KSM_BEFORE.get(k) != now.get(k)
    ]


def production_changes() -> list[str]:
    """Production paths that differ from the session's start."""
    changed = []
    for d in PRODUCTION_DIRS:
        before, after = _BEFORE[str(d)], fingerprint(d)
        changed += sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return changed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    changed = production_changes()
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (
            "tests wrote under production paths (they must use $MEMD_RUN_DIR / "
            f"$MEMD_STATE_DIR): {', '.join(changed[:10])}"
        )
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    knobs = ksm_changes()
    if knobs:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"tests left the host's KSM knobs changed: {'; '.join(knobs)}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(_SANDBOX, ignore_errors=True)
