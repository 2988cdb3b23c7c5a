"""Benchmarks keep their agents off production paths (issue 9, point 3).

``benchmarks/protocol_bench.py`` runs a real ``memd serve``.  It once did so with the
default state path, and the production agent later restored 40,000 of its pages.  Here
the benchmark's own agent runs with the production defaults in force (no
``$MEMD_RUN_DIR``/``$MEMD_STATE_DIR``), stores a persistent page (into whatever store
it uses) and is stopped, and nothing under /run/memd or /var/lib/memd may have changed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from memd import paths
from memd.guest.client import GuestClient
from tests.conftest import fingerprint

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "protocol_bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protocol_bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_bench_agent_never_touches_production_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEMD_RUN_DIR", raising=False)
    monkeypatch.delenv("MEMD_STATE_DIR", raising=False)
    monkeypatch.delenv("MEMD_SOCKET", raising=False)
    before = {d: fingerprint(d) for d in (paths.PRODUCTION_RUN_DIR, paths.PRODUCTION_STATE_DIR)}
    bench = _load_bench()
    with bench.agent_process(str(tmp_path), 1) as (sockets, _pid):
        client = GuestClient.for_unix_socket(sockets[0], boot_id=os.urandom(16), timeout=10.0)
        with client:
            client.connect()
            pool = client.new_pool(persistent=True)
            client.put(pool, 1, 0, b"p" * 4096)
    after = {d: fingerprint(d) for d in before}
    assert after == before
    assert (tmp_path / "control.sock").exists() is False  # its own socket, removed at stop
