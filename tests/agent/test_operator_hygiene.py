"""What an operator meets on a production host: attach mistakes, budgets, stale state,
clients nobody attached, pipes, logs (issue 9, points 3, 4 and 8)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memd import paths
from memd.agent.app import AgentApp
from memd.agent.commands import ScanArgs
from memd.cli import main
from tests.agent.conftest import RunningAgent
from tmem.types import PoolFlag


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- attach ------------------------------------------------------------------------------


def test_attach_to_a_missing_socket_fails_in_one_sentence(
    agent: RunningAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", agent.control)
    missing = tmp_path / "nope.sock"
    code, out, err = run(capsys, *sock, "attach", "vmx", "--path", str(missing))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "does not exist" in err and str(missing) in err
    regular = tmp_path / "file"
    regular.write_text("x")
    code, _, err = run(capsys, *sock, "attach", "vmx", "--path", str(regular))
    assert code == 1 and "not a unix socket" in err and err.count("\n") == 1
    # A socket file nobody listens on (a QEMU that died): refused, not retried forever.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    code, _, err = run(capsys, *sock, "attach", "vmx", "--path", str(dead))
    assert code == 1 and "connecting to" in err and "refused" in err.lower()
    assert agent.app.agent.channels == {}  # nothing half-attached stays behind
    code, out, _ = run(capsys, *sock, "guests", "--json")
    assert json.loads(out) == []


def test_attach_to_a_listening_socket_works_and_guests_shows_last_error(
    agent: RunningAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "qemu.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    try:
        code, out, err = run(
            capsys, "--socket", agent.control, "attach", "vmq", "--path", str(path)
        )
        assert code == 0 and out.startswith("attached vmq") and err == ""
        conn, _ = server.accept()
        conn.close()  # QEMU goes away: the agent keeps retrying and says why
        server.close()
        os.unlink(path)
        deadline = time.monotonic() + 10
        while agent.app.agent.channels["vmq"].last_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code, out, _ = run(capsys, "--socket", agent.control, "guests")
        assert "LAST_ERROR" in out.splitlines()[0] and "FileNotFoundError" in out
    finally:
        server.close()


# -- budget ------------------------------------------------------------------------------


def test_budget_is_echoed_and_nonsense_is_refused(
    agent: RunningAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", agent.control)
    code, out, _ = run(capsys, *sock, "budget", "64M")
    assert code == 0 and out.startswith("budget set to 64M (was 32M)")
    assert agent.app.tmem.store_stats().budget_bytes == 64 << 20
    for tiny in ("16K", "0"):
        code, out, err = run(capsys, *sock, "budget", tiny)
        assert (code, out) == (1, "") and "too small" in err and err.count("\n") == 1
    assert agent.app.tmem.store_stats().budget_bytes == 64 << 20
    with pytest.raises(SystemExit) as exit_info:
        main([*sock, "budget", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not a size: '-1'" in err and err.count("\n") == 1


def test_budget_below_persistent_use_warns(
    agent: RunningAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    path = agent.add_guest("vm-p")
    with agent.client(path) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        for i in range(400):
            c.put(pool, 1, i, os.urandom(4096))
    code, out, _ = run(capsys, "--socket", agent.control, "budget", "1M")
    assert code == 0 and "warning: persistent pages hold" in out and "NO_SPACE" in out


# -- state that is not this agent's, clients nobody attached ------------------------------


def _persistent_client(app: AgentApp, name: str, pages: int) -> None:
    app.tmem.add_client(name)
    pool = app.tmem.new_pool(name, PoolFlag.PERSISTENT)
    for i in range(pages):
        app.tmem.put(name, pool, (1, 0, 0), i, bytes([i % 251 + 1]) * 4096)


def test_store_says_who_wrote_it_and_foreign_ones_are_refused_or_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypervisor.lmdb_store import LmdbStore
    from memd.errors import BackendError

    where = tmp_path / "store"
    prod = str(tmp_path / "prod.sock")

    def store(control: str | None) -> LmdbStore:
        return LmdbStore(
            where, budget_bytes=8 << 20, control_path=control, host_boot_id=paths.host_boot_id()
        )

    writer = AgentApp(budget_bytes=8 << 20, store=store(prod))
    _persistent_client(writer, "g0", 10)
    with pytest.raises(BackendError, match="in use by another memd agent"):
        store(prod)  # two agents on one store: never
    assert writer.store is not None
    writer.store.close()
    # The same agent (same control socket, same host boot) gets its pages back.
    again = AgentApp(budget_bytes=8 << 20, store=store(prod))
    assert again.tmem.store_stats().persistent_pages == 10
    assert again.store is not None
    again.store.close()
    # Another agent's store (a benchmark's, say) is refused, in one sentence.
    with pytest.raises(BackendError, match=r"belongs to the agent serving .*prod\.sock"):
        store(str(tmp_path / "bench.sock"))
    # One written before the host rebooted describes guests that are gone.
    monkeypatch.setattr(paths, "host_boot_id", lambda: "another-boot")
    fresh = AgentApp(budget_bytes=8 << 20, store=store(prod))
    assert fresh.tmem.client_names() == []
    assert fresh.store is not None
    fresh.store.close()
    # A --durable store is kept across a host reboot (it is intact even after a power
    # loss); the guests' pools go when they say HELLO with their new boot ids.
    durable = LmdbStore(where, budget_bytes=8 << 20, control_path=prod, durable=True)
    app = AgentApp(budget_bytes=8 << 20, store=durable)
    _persistent_client(app, "g0", 3)
    durable.close()
    monkeypatch.setattr(paths, "host_boot_id", lambda: "a-third-boot")
    durable = LmdbStore(
        where,
        budget_bytes=8 << 20,
        control_path=prod,
        durable=True,
        host_boot_id=paths.host_boot_id(),
    )
    assert AgentApp(budget_bytes=8 << 20, store=durable).tmem.store_stats().persistent_pages == 3
    durable.close()


def test_clients_lists_unattached_and_drop_needs_confirmation(
    agent: RunningAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = ("--socket", agent.control)
    agent.add_guest("live")
    _persistent_client(agent.app, "g0", 5)  # as a reopened store leaves it
    rows = {r["client"]: r for r in json.loads(run(capsys, *sock, "clients", "--json")[1])}
    assert rows["g0"]["attached"] is False and rows["g0"]["persistent_pages"] == 5
    code, out, _ = run(capsys, *sock, "status")
    assert code == 0 and "not attached hold pages: g0" in out and "None" not in out
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = run(capsys, *sock, "drop", "g0")
    assert code == 1 and "--yes" in err and agent.app.tmem.has_client("g0")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, _, _ = run(capsys, *sock, "drop", "g0")
    assert code == 1 and agent.app.tmem.has_client("g0")
    agent.app.tmem.add_client("live")
    code, _, err = run(capsys, *sock, "drop", "live", "--yes")
    assert code == 1 and "detach it first" in err
    code, out, _ = run(capsys, *sock, "drop", "g0", "--yes")
    assert code == 0 and out.strip() == "dropped g0 (5 pages)"
    assert not agent.app.tmem.has_client("g0") and agent.app.tmem.audit() == []


# -- output -------------------------------------------------------------------------------


def test_status_names_ksm_instead_of_none(
    agent: RunningAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--socket", agent.control, "status")
    assert code == 0 and "None" not in out
    assert out.splitlines()[0].startswith("agent     running")
    assert any(line.startswith("ksm ") for line in out.splitlines())
    (store,) = [line for line in out.splitlines() if line.startswith("store ")]
    assert str(agent.store.path) in store and "in use" in store


def test_json_into_a_closed_pipe_is_quiet(agent: RunningAgent) -> None:
    # More JSON than a pipe holds (64 KiB), so the writer meets the closed pipe.
    for n in range(16):
        agent.app.tmem.add_client(f"vm-pipe{n}")
        for _ in range(16):
            agent.app.tmem.new_pool(f"vm-pipe{n}", PoolFlag.EPHEMERAL)
    proc = subprocess.run(
        f"{sys.executable} -m memd.cli --socket {agent.control} pools --json | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.strip() == "[" and proc.stderr == ""


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memd.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.startswith("memd ") and proc.stdout.split()[1][0].isdigit()


def test_json_log_lines_name_the_event_and_the_vm(tmp_path: Path) -> None:
    """`serve --log-json`: one JSON object per line, with event and vm fields."""
    control = tmp_path / "control.sock"
    guest = tmp_path / "g.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(control),
            "serve",
            "--store",
            "",
            "--log-json",
            "--listen",
            f"vm-log={guest}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines and all({"ts", "level", "event", "vm", "msg"} <= set(d) for d in lines)
    attach = [d for d in lines if d["event"] == "attach"]
    assert attach and attach[0]["vm"] == "vm-log"


def test_guest_cli_says_how_long_it_really_waited() -> None:
    from memd.errors import Unavailable
    from memd.guest.client import GuestClient

    def never() -> object:
        raise OSError("no port")

    client = GuestClient(never, reconnect_timeout=1.5, timeout=0.2)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        client.connect()
    waited = time.monotonic() - t0
    assert "gave up after" in str(info.value)
    said = int(str(info.value).split("gave up after ")[1].split(" s")[0])
    assert abs(said - waited) <= 1


def test_scan_on_an_agent_of_real_guests_points_to_ksm() -> None:
    from memd.errors import NotFound

    app = AgentApp(budget_bytes=8 << 20)  # no simulated machine, as `memd serve` runs
    with pytest.raises(NotFound, match="memd ksm") as info:
        app.handlers.scan(ScanArgs())
    assert "not enabled" not in str(info.value)
