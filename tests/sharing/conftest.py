"""Fixtures for the sharing tests: a small SimMachine and a manager over it."""

from __future__ import annotations

import pytest

from hypervisor.simmachine import SimMachine
from sharing.manager import SharingManager


@pytest.fixture
def machine() -> SimMachine:
    return SimMachine(256)


@pytest.fixture
def mgr(machine: SimMachine) -> SharingManager:
    return SharingManager(machine, cross_domain_default=True)
