"""Shared helpers for the tmem tests."""

from __future__ import annotations

import os
import random

import pytest

from tmem.host import TmemHost
from tmem.types import PAGE_SIZE

OID = (1, 2, 3)


def text_page(seed: int) -> bytes:
    """A compressible, seed-unique page."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00" * 8, b"pointer"]
    body = b" ".join(rng.choice(words) for _ in range(800))
    return (seed.to_bytes(8, "little") + body)[:PAGE_SIZE].ljust(PAGE_SIZE, b".")


def random_page() -> bytes:
    return os.urandom(PAGE_SIZE)


@pytest.fixture
def host() -> TmemHost:
    h = TmemHost(budget_bytes=64 << 20)
    h.add_client("vm1")
    h.add_client("vm2")
    return h
