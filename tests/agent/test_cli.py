"""The `memd` CLI against a real running agent, and its one-line operator errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memd.cli import main
from tests.agent.conftest import RunningAgent
from tests.support.users import as_nobody


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_everywhere(agent: RunningAgent, capsys: pytest.CaptureFixture[str]) -> None:
    path = agent.add_guest("vm-a")
    with agent.client(path) as c:
        c.connect()
        pool = c.new_pool(persistent=True)
        c.put(pool, 1, 0, b"x" * 4096)
    sock = ("--socket", agent.control)
    code, out, _ = run(capsys, *sock, "status", "--json")
    status = json.loads(out)
    assert code == 0 and status["runstate"] == "running" and status["guests"] == 1
    assert status["tmem"]["pages"] == 1
    guests = json.loads(run(capsys, *sock, "guests", "--json")[1])
    assert [(g["name"], g["connected"], g["pools"]) for g in guests] == [("vm-a", False, 1)]
    pools = json.loads(run(capsys, *sock, "pools", "vm-a", "--json")[1])
    assert [(p["kind"], p["pages"], p["puts"]) for p in pools] == [("persistent", 1, 1)]
    stats = json.loads(run(capsys, *sock, "stats", "--json")[1])
    assert stats["clients"][0]["client"] == "vm-a" and stats["store"]["pages"] == 1
    code, out, _ = run(capsys, *sock, "audit", "--json")
    assert code == 0 and json.loads(out)["clean"] is True
    scan = json.loads(run(capsys, *sock, "scan", "--json")[1])
    assert scan["pages_scanned"] >= 256


def test_human_tables(agent: RunningAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.add_guest("vm-b")
    code, out, _ = run(capsys, "--socket", agent.control, "guests")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["NAME", "CONNECTED", "MODE"]
    assert "vm-b" in out
    code, out, _ = run(capsys, "--socket", agent.control, "audit")
    assert code == 0 and out.startswith("audit: clean")


def test_operator_mistakes_are_one_sentence(
    agent: RunningAgent, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--socket", "/nonexistent/memd.sock", "status")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "not running" in err and "memd serve" in err
    code, _, err = run(capsys, "--socket", agent.control, "detach", "no-such-vm")
    assert code == 1 and err == "memd: no guest named 'no-such-vm' is attached\n"
    code, _, err = run(capsys, "--socket", agent.control, "authorize", "vm", "not-a-uuid")
    assert code == 1 and err.count("\n") == 1 and "uuid" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--socket", agent.control, "budget", "lots"])
    assert exit_info.value.code == 2  # argparse: usage error


def test_memd_migrate_cancel_mistakes_are_one_sentence(
    agent: RunningAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", agent.control)
    code, _, err = run(capsys, *sock, "migrate", "vm-x", "--cancel")
    assert code == 1 and err == "memd: no outgoing transfer of vm-x runs on this agent\n"
    code, _, err = run(capsys, *sock, "migrate", "vm-x", "--cancel", "--to", "10.0.0.2:77")
    assert code == 1 and err.count("\n") == 1 and "--cancel takes only the guest" in err
    code, _, err = run(capsys, *sock, "migrate", "vm-x")
    assert code == 1 and err == "memd: migrate needs --to HOST:PORT (or --cancel)\n"
    to = ("--to", "10.0.0.2:7700")
    code, _, err = run(capsys, *sock, "migrate", "vm-x", *to, "--arm-timeout", "0")
    assert code == 1 and err.count("\n") == 1 and "--arm-timeout" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize("mode", [0o600, 0o666], ids=["file-mode", "peer-credentials"])
def test_other_users_are_refused(agent: RunningAgent, mode: int) -> None:
    os.chmod(os.path.dirname(agent.control), 0o755)  # let nobody reach the socket file
    os.chmod(agent.control, mode)  # 0666: only the SO_PEERCRED check stands in the way
    message = as_nobody(
        "from memd.agent import control",
        f"result = control.call('status', path={agent.control!r}, timeout=10) and 'served'",
    )
    assert message.startswith("PermissionDenied: ")


def test_demo_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memd.cli", "demo", "--json", "--guests", "3", "--guest-mib", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["guests"] == 3 and result["audit"]["errors"] == 0
    assert result["sharing"]["saved_frames"] > 0 and result["byte_mismatches"] == 0
    assert result["tmem"]["pages"] > 0 and result["tmem"]["dedup_hits"] > 0


def test_guest_cli_dedup_consent(
    agent: RunningAgent, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from memd.guest.cli import main as guest_main

    page = tmp_path / "page"  # type: ignore[operator]
    page.write_bytes(bytes(range(256)) * 16)
    paths = {vm: agent.add_guest(vm) for vm in ("a", "b", "c")}
    for vm, path in paths.items():
        consent = ["--dedup"] if vm != "c" else []
        assert guest_main(["--socket", path, *consent, "new-pool", "--persistent"]) == 0
        assert guest_main(["--socket", path, *consent, "put", "0", "1", "0", str(page)]) == 0
    capsys.readouterr()
    store = agent.app.tmem.store_stats()
    # a and b consented: one blob between them; c did not: its own copy.
    assert (store.pages, store.unique_blobs) == (3, 2)
