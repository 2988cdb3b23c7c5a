"""memd libvirt-hook: libvirt's qemu hook on a destination refuses an incoming migration of
a memd guest that no memd transfer is bringing, and lets everything else through.

The agents are real (in-process, a control socket, a TLS migration listener, a source
agent whose transfer is connected); the hook runs as libvirt runs it: argv, the domain XML
on stdin, the exit status and stderr read back, through the installed qemu.d script too.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.domain_xml import CHANNEL_XML, swap_disk_xml
from hypervisor.lmdb_store import LmdbStore
from memd import libvirt_hook
from memd.agent.app import AgentApp
from memd.migrate.transport import SourceTransfer
from tests.support.loop_thread import LoopThread, shut_down
from tests.support.tls import make_pki
from tmem.types import PoolFlag

ROOT = Path(__file__).resolve().parents[2]
MEMD_GUEST = f"<domain type='kvm'><name>vm1</name><devices>{CHANNEL_XML}</devices></domain>"
SWAP_ONLY = (
    "<domain type='kvm'><name>vm2</name><devices>"
    f"{swap_disk_xml('/run/memd-nbd/vm2.nbd', 'vdb', 5)}</devices></domain>"
)
PLAIN_GUEST = (
    "<domain type='kvm'><name>web</name><devices><channel type='unix'>"
    "<target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>"
)


class Agents:
    """A destination agent (control socket, migration listener) and a source agent, on one
    loop thread; :meth:`arriving` connects a transfer of vm1 from the source."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = make_pki(tmp / "pki")
        self.control = str(tmp / "dst.sock")
        self.loop = LoopThread()
        self.stores = [
            LmdbStore(tmp / n, budget_bytes=16 << 20, control_path=str(tmp / f"{n}.lock"))
            for n in ("dst", "src")
        ]
        self.dst = AgentApp(budget_bytes=16 << 20, store=self.stores[0], tls_dir=self.pki)
        self.src = AgentApp(budget_bytes=16 << 20, store=self.stores[1], tls_dir=self.pki)
        self.loop.run(self.dst.start(self.control))
        self.loop.run(self.src.start(None))
        self.listening = self.loop.run(self.dst.migration.listen("127.0.0.1:0"))
        self.transfer: SourceTransfer | None = None

    def arriving(self, guest: str = "vm1") -> None:
        tmem = self.src.tmem
        tmem.open_session(guest, cap_pages=None, dedup=False, meta={}, reset=False)
        pool = tmem.new_pool(guest, PoolFlag.PERSISTENT)
        tmem.put(guest, pool, (1, 0, 0), 0, b"p" * 4096)

        async def connect() -> SourceTransfer:
            transfer = self.src.migration._source(guest, f"127.0.0.1:{self.listening[1]}")
            await transfer.connect()  # BEGIN → READY: the destination tracks it
            return transfer

        self.transfer = self.loop.run(connect())
        deadline = time.monotonic() + 10
        while guest not in self.dst.migration.incoming and time.monotonic() < deadline:
            time.sleep(0.02)
        assert guest in self.dst.migration.incoming

    def close(self) -> None:
        if self.transfer is not None:
            self.loop.run(self.transfer.abort("test over"))
            self.src.migration.outgoing.clear()
        shut_down(self.loop, (self.src, self.dst), self.stores)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Agents]:
    running = Agents(tmp_path)
    try:
        yield running
    finally:
        running.close()


def hook(
    *args: str, xml: str = MEMD_GUEST, socket: str, script: Path | None = None
) -> tuple[int, str, str]:
    """Run the hook as libvirt does: a new process, argv, the XML on stdin."""
    argv = [str(script)] if script else [sys.executable, "-m", "memd.libvirt_hook"]
    if script is None:
        argv += ["--socket", socket]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*argv, *args], input=xml, capture_output=True, text=True, env=env, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def test_an_incoming_memd_guest_passes_when_its_transfer_is_arriving(agents: Agents) -> None:
    agents.arriving("vm1")
    assert hook("vm1", "migrate", "begin", "-", socket=agents.control) == (0, "", "")


def test_a_memd_guest_with_no_transfer_is_refused_in_one_sentence(agents: Agents) -> None:
    agents.arriving("vm1")
    code, out, err = hook("vm9", "migrate", "begin", "-", socket=agents.control)
    assert (code, out) == (1, "")  # stdout stays empty: libvirt would take it for XML
    assert err == (
        "memd: vm9 keeps persistent pages in memd on its source host, and no memd transfer "
        "is arriving for it; run `memd migrate vm9 --to "
        f"127.0.0.1:{agents.listening[1]}` on the source first\n"
    )
    code, _, err = hook("vm2", "migrate", "begin", "-", xml=SWAP_ONLY, socket=agents.control)
    assert code == 1 and err.startswith("memd: vm2 keeps persistent pages in memd")


def test_other_guests_and_other_operations_pass(agents: Agents) -> None:
    for args, xml in [
        (("web", "migrate", "begin", "-"), PLAIN_GUEST),
        (("vm1", "prepare", "begin", "-"), MEMD_GUEST),
        (("vm1", "start", "begin", "-"), MEMD_GUEST),
        (("vm1", "reconnect", "begin", "-"), MEMD_GUEST),  # a failure would kill its QEMU
        (("vm1", "release", "end", "migrated"), MEMD_GUEST),
        (("vm1", "some-future-op", "begin", "-"), MEMD_GUEST),
        (("vm1", "migrate", "end", "-"), MEMD_GUEST),
        (("vm1", "migrate", "begin", "-"), "<domain><devices>"),  # not ours to judge
    ]:
        assert hook(*args, xml=xml, socket=agents.control) == (0, "", ""), args


def test_without_an_agent_only_memd_guests_are_refused(tmp_path: Path) -> None:
    gone = str(tmp_path / "no-agent.sock")
    assert hook("web", "migrate", "begin", "-", xml=PLAIN_GUEST, socket=gone) == (0, "", "")
    assert hook("vm1", "start", "begin", "-", socket=gone) == (0, "", "")
    code, out, err = hook("vm1", "migrate", "begin", "-", socket=gone)
    assert (code, out) == (1, "")
    assert err == (
        "memd: vm1 keeps persistent pages in memd on its source host, and this host cannot "
        f"receive them: the memd agent is not running (no control socket at {gone}); start "
        "it with 'memd serve'\n"
    )


def test_an_agent_that_accepts_no_migrations_is_named(tmp_path: Path) -> None:
    loop, control = LoopThread(), str(tmp_path / "c.sock")
    app = AgentApp(budget_bytes=16 << 20)
    loop.run(app.start(control))
    try:
        code, _, err = hook("vm1", "migrate", "begin", "-", socket=control)
    finally:
        loop.run(app.stop())
        loop.close()
    assert code == 1
    assert "the memd agent here does not accept migrations (start it with --migrate-listen" in err


def test_the_decision_reads_nothing_it_does_not_need() -> None:
    def no_xml() -> str:
        raise AssertionError("read the XML for an operation it does not guard")

    def no_agent() -> dict[str, object]:
        raise AssertionError("asked the agent about a guest that is not memd's")

    assert libvirt_hook.verdict("vm1", "started", "begin", no_xml, no_agent) is None
    assert libvirt_hook.verdict("web", "migrate", "begin", lambda: PLAIN_GUEST, no_agent) is None
    arriving = {"listening": "10.0.0.2:7700", "active": [{"guest": "vm1", "direction": "in"}]}
    leaving = {"listening": "10.0.0.2:7700", "active": [{"guest": "vm1", "direction": "out"}]}
    assert (
        libvirt_hook.verdict("vm1", "migrate", "begin", lambda: MEMD_GUEST, lambda: arriving)
        is None
    )
    refusal = libvirt_hook.verdict("vm1", "migrate", "begin", lambda: MEMD_GUEST, lambda: leaving)
    assert refusal is not None and "--to 10.0.0.2:7700" in refusal


def test_install_writes_a_script_libvirt_can_run(agents: Agents, tmp_path: Path) -> None:
    from memd.cli import main

    hooks = tmp_path / "hooks"
    assert (
        main(["--socket", agents.control, "libvirt-hook", "--install", "--hooks-dir", str(hooks)])
        == 0
    )
    script = hooks / "qemu.d" / "memd"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert sorted(p.name for p in script.parent.iterdir()) == ["memd"]
    assert hook("vm1", "migrate", "begin", "-", socket="", script=script)[0] == 1
    assert hook("web", "migrate", "begin", "-", xml=PLAIN_GUEST, socket="", script=script) == (
        0,
        "",
        "",
    )
    assert hook("vm1", "release", "end", "-", socket="", script=script) == (0, "", "")
    agents.arriving("vm1")
    assert hook("vm1", "migrate", "begin", "-", socket="", script=script) == (0, "", "")
    # a second install rewrites the script in place
    assert (
        main(["--socket", agents.control, "libvirt-hook", "--install", "--hooks-dir", str(hooks)])
        == 0
    )
    assert sorted(p.name for p in script.parent.iterdir()) == ["memd"]


def test_the_cli_command_is_the_same_guard(
    agents: Agents, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from memd.cli import main

    agents.arriving("vm1")
    for domain, code in (("vm1", 0), ("vm9", 1)):
        monkeypatch.setattr(sys, "stdin", io.StringIO(MEMD_GUEST))
        assert (
            main(["--socket", agents.control, "libvirt-hook", domain, "migrate", "begin", "-"])
            == code
        )
        out, err = capsys.readouterr()
        assert out == "" and (err == "") == (code == 0)


def test_hook_usage_mistakes_are_one_sentence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from memd.cli import main

    assert main(["libvirt-hook", "vm1"]) == 2
    assert capsys.readouterr().err.startswith("memd: libvirt-hook takes DOMAIN OPERATION")
    assert main(["libvirt-hook", "--install", "vm1", "--hooks-dir", str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err == "memd: --install takes no DOMAIN arguments (only --hooks-dir)\n"
    )
    (tmp_path / "file").write_text("")
    assert main(["libvirt-hook", "--install", "--hooks-dir", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("memd: ") and err.count("\n") == 1 and "Traceback" not in err
