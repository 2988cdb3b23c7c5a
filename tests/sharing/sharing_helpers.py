"""Helpers shared by the sharing tests (imported by name: tests/sharing is on sys.path)."""

from __future__ import annotations

PS = 4096


def page(tag: bytes) -> bytes:
    """A whole page of recognisable content."""
    return (tag * (PS // len(tag) + 1))[:PS]
