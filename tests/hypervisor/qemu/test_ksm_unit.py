"""hypervisor.ksm over a fake sysfs directory (values, snapshot/restore order)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor import ksm
from memd.errors import Unavailable


def fake_ksm(tmp_path: Path) -> Path:
    root = tmp_path / "ksm"
    root.mkdir()
    for name, value, mode in [
        ("run", "0", 0o644),
        ("pages_to_scan", "100", 0o644),
        ("sleep_millisecs", "20", 0o644),
        ("advisor_mode", "[none] scan-time", 0o644),
        ("pages_shared", "7", 0o444),
        ("pages_sharing", "21", 0o444),
    ]:
        (root / name).write_text(value + "\n")
        (root / name).chmod(mode)
    return root


def test_values_counters_and_restore(tmp_path: Path) -> None:
    root = fake_ksm(tmp_path)
    assert ksm.get("advisor_mode", root) == "none"
    assert ksm.counters(root) == {"pages_shared": 7, "pages_sharing": 21}
    saved = ksm.snapshot(root)
    assert saved == {"advisor_mode": "none", "pages_to_scan": 100, "run": 0, "sleep_millisecs": 20}
    with ksm.settings(root, run=1, pages_to_scan=5000):
        assert ksm.get("run", root) == 1 and ksm.get("pages_to_scan", root) == 5000
    assert ksm.snapshot(root) == saved


def test_restore_after_an_exception_and_missing_ksm(tmp_path: Path) -> None:
    root = fake_ksm(tmp_path)
    with pytest.raises(RuntimeError), ksm.settings(root, sleep_millisecs=1):
        raise RuntimeError("test failed midway")
    assert ksm.get("sleep_millisecs", root) == 20
    with pytest.raises(Unavailable):
        ksm.read_all(tmp_path / "nope")
