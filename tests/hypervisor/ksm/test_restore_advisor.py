"""Restoring KSM knobs around KSM's advisor (the real sysfs, as root).

While ``advisor_mode`` is ``scan-time`` the advisor owns ``pages_to_scan``: the kernel
refuses writes to it (EINVAL), and turning the advisor off resets it to the default.
:func:`hypervisor.ksm.restore` must get both directions right.  The test leaves every
knob as it found it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from hypervisor import ksm

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="KSM sysfs needs root"),
    pytest.mark.skipif(
        not ksm.available() or not (ksm.KSM_DIR / "advisor_mode").exists(),
        reason="kernel without KSM's advisor",
    ),
]


@pytest.fixture(autouse=True)
def host_knobs() -> Iterator[None]:
    host = ksm.snapshot()
    try:
        yield
    finally:
        ksm.restore(host)


def test_an_advisor_that_was_on_comes_back_last() -> None:
    ksm.set_knob("advisor_mode", "scan-time")
    originals = ksm.snapshot()  # what an agent records before it steers; by then the
    originals["pages_to_scan"] = 30000  # advisor had raised the rate (as ksmd ran)
    ksm.set_knob("advisor_mode", "none")  # steering turns the advisor off, then
    ksm.set_knob("pages_to_scan", 4321)  # sets its own rate
    ksm.restore(originals)
    assert ksm.get("advisor_mode") == "scan-time"


def test_an_advisor_that_was_off_goes_off_first() -> None:
    ksm.set_knob("advisor_mode", "none")
    ksm.set_knob("pages_to_scan", 321)
    originals = ksm.snapshot()
    ksm.set_knob("advisor_mode", "scan-time")  # someone turned the advisor on meanwhile
    ksm.restore(originals)
    assert ksm.get("advisor_mode") == "none"
    assert ksm.get("pages_to_scan") == 321
