"""A real Prometheus (Debian's ``prometheus``) scrapes a real ``memd serve --metrics``.

The test starts its own Prometheus on a free loopback port, with its own configuration
and storage in the test's tmp dir (a system instance, if any, is not touched), pointing
at a ``memd serve`` subprocess; a guest puts and gets pages over the real protocol; then
Prometheus's HTTP API must return memd's series with the values the guest produced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from memd.guest.client import GuestClient

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ROOT = Path(__file__).resolve().parents[2]
PUTS, GETS = 37, 12

pytestmark = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason="prometheus is not installed (scripts/setup.sh --all)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(what: str, predicate: object, timeout: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"{what}: not within {timeout:g} s\n{tails}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _query(port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _value(port: int, promql: str) -> float | None:
    result = _query(port, promql)
    if len(result) != 1:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def test_prometheus_scrapes_what_the_guest_did(tmp_path: Path) -> None:
    metrics_port, prom_port = _free_port(), _free_port()
    guest_sock = tmp_path / "vm-prom.sock"
    env = dict(
        os.environ, MEMD_RUN_DIR=str(tmp_path / "run"), MEMD_STATE_DIR=str(tmp_path / "state")
    )
    memd_log = tmp_path / "memd.log"
    with memd_log.open("wb") as out:
        memd = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memd.cli",
                "--socket",
                str(tmp_path / "control.sock"),
                "serve",
                "--store",
                "",
                "--listen",
                f"vm-prom={guest_sock}",
                "--metrics",
                f"127.0.0.1:{metrics_port}",
            ],
            stdout=out,
            stderr=out,
            cwd=str(ROOT),
            env=env,
        )
    prom_log = tmp_path / "prometheus.log"
    prom: subprocess.Popen[bytes] | None = None
    try:
        _wait_for("memd serve listening for the guest", guest_sock.exists, 30, memd_log)
        with GuestClient.for_unix_socket(
            str(guest_sock), boot_id=os.urandom(16), timeout=10.0, reconnect_timeout=10.0
        ) as guest:
            pool = guest.new_pool(persistent=True)
            for i in range(PUTS):
                guest.put(pool, 5, i, (i.to_bytes(4, "little") + b"scrape me " * 410)[:4096])
            for i in range(GETS):
                assert guest.get(pool, 5, i) is not None

            config = tmp_path / "prometheus.yml"
            config.write_text(
                "global:\n"
                "  scrape_interval: 1s\n"
                "  evaluation_interval: 1s\n"
                "scrape_configs:\n"
                "  - job_name: memd\n"
                "    static_configs:\n"
                f"      - targets: ['127.0.0.1:{metrics_port}']\n"
            )
            with prom_log.open("wb") as out:
                prom = subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--web.enable-lifecycle",
                    ],
                    stdout=out,
                    stderr=out,
                    cwd=str(tmp_path),
                )
            sel = '{job="memd",vm="vm-prom"}'
            _wait_for(
                f"Prometheus reporting memd_tmem_puts_total{sel} == {PUTS}",
                lambda: _value(prom_port, f"memd_tmem_puts_total{sel}") == PUTS,
                60,
                prom_log,
                memd_log,
            )
            assert _value(prom_port, f"memd_tmem_gets_total{sel}") == GETS
            assert _value(prom_port, f"memd_tmem_get_hits_total{sel}") == GETS
            assert (
                _value(prom_port, 'memd_tmem_pages{job="memd",vm="vm-prom",pool_kind="persistent"}')
                == PUTS
            )
            assert (
                _value(prom_port, 'memd_tmem_bytes{job="memd",vm="vm-prom",pool_kind="persistent"}')
                == PUTS * 4096
            )
            assert _value(prom_port, f"memd_agent_guest_connected{sel}") == 1
            assert (
                _value(prom_port, 'memd_agent_request_duration_seconds_count{job="memd",op="put"}')
                == PUTS
            )
            assert _value(prom_port, 'up{job="memd"}') == 1
            # the histogram as an operator's dashboard asks for it
            p99 = _value(
                prom_port,
                "histogram_quantile(0.99, sum by (le) "
                '(memd_agent_request_duration_seconds_bucket{op="put"}))',
            )
            assert p99 is not None and 0 < p99 <= 1.0
            # every query of the shipped dashboard parses and runs
            board = json.loads((ROOT / "docs" / "grafana-memd.json").read_text())
            for panel in board["panels"]:
                for target in panel.get("targets", []):
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", "1m")
                        .replace("$instance", ".*")
                        .replace("$vm", ".*")
                    )
                    _query(prom_port, expr)  # asserts status success
            puts = _query(prom_port, 'sum by (vm) (memd_tmem_puts_total{instance=~".*",vm=~".*"})')
            assert {
                r["metric"]["vm"]: float(r["value"][1])  # type: ignore[index]
                for r in puts
            } == {"vm-prom": PUTS}
    finally:
        if prom is not None:
            _stop(prom)
        _stop(memd)
    assert memd.returncode == 0, memd_log.read_text()[-3000:]
