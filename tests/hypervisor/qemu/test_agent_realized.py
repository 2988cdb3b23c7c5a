"""`memd audit` on real QEMU guests: pagemap ground truth through the agent and the CLI."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from hypervisor import ksm
from hypervisor.procmem import ProcessMemory, qemu_pid_for_socket
from hypervisor.qmp import query_memdev
from memd import wire
from memd.agent.app import AgentApp
from memd.agent.dispatch import GuestState
from memd.cli import main
from memd.errors import SharingDenied
from memd.wire import Capability, Status
from tests.hypervisor.qemu.conftest import PlainQemu, needs_qemu_root
from tests.support.loop_thread import LoopThread

pytestmark = needs_qemu_root

BASE_GFN = 0x1000
NPAGES = 64


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[AgentApp, str]]:
    loop = LoopThread()
    agent = AgentApp(budget_bytes=16 << 20)
    control = str(tmp_path / "control.sock")
    loop.run(agent.start(control))
    try:
        yield agent, control
    finally:
        loop.run(agent.stop())
        loop.close()
        if agent.real.machine is not None:
            agent.real.machine.close()


def _qmp_path(q: PlainQemu) -> str:
    argv = Path(f"/proc/{q.pid}/cmdline").read_bytes().split(b"\0")
    spec = argv[argv.index(b"-qmp") + 1].decode()
    return spec.removeprefix("unix:").split(",")[0]


def test_audit_shows_cross_vm_frames_and_explains_a_page(
    start_qemu: Callable[..., PlainQemu],
    ksm_restored: dict[str, int | str],
    app: tuple[AgentApp, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent, control = app
    a, b = start_qemu("vm-a"), start_qemu("vm-b")
    assert qemu_pid_for_socket(_qmp_path(a)) == a.pid  # how `serve --qmp` finds the pid
    for q in (a, b):
        agent.real.attach(q.name, q.pid, q.monitor)
    assert agent.real.machine is not None
    data = np.random.default_rng(5).integers(0, 256, NPAGES * 4096, dtype=np.uint8).tobytes()
    for guest in agent.real.machine.guests():
        with ProcessMemory(guest.pid, writable=True) as mem:
            mem.write(int(guest.gfn_vaddr[BASE_GFN]), data)
    gfns = np.arange(BASE_GFN, BASE_GFN + NPAGES)
    da, db = (agent.real.machine.guest(n).domid for n in ("vm-a", "vm-b"))

    def merged() -> bool:
        return bool((agent.real.machine.p2m(da)[gfns] == agent.real.machine.p2m(db)[gfns]).all())  # type: ignore[union-attr]

    with ksm.settings(pages_to_scan=20000, sleep_millisecs=10, run=1):
        assert ksm.wait_for(merged, timeout=30)
        assert main(["--socket", control, "audit", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        realized = report["realized"]
        assert realized["frames"]["shared"] >= NPAGES
        vms = realized["matrix"]["vms"]
        cross = realized["matrix"]["frames"][vms.index("vm-a")][vms.index("vm-b")]
        assert cross >= NPAGES
        assert report["clean"] and realized["discrepancies"] == []

        assert main(["--socket", control, "audit", "--gfn", f"vm-a:{BASE_GFN:#x}", "--json"]) == 0
        page = json.loads(capsys.readouterr().out)
        assert page["mfn"] == int(agent.real.machine.p2m(db)[BASE_GFN])
        assert {"vm": "vm-b", "gfn": BASE_GFN} in page["mapped_by"]

        assert page["mapped_by_count"] == page["refs"] - 1 >= 1

        assert main(["--socket", control, "audit", "--gfn", f"vm-a:{BASE_GFN:#x}"]) == 0
        human = capsys.readouterr().out
        mapped = next(line for line in human.splitlines() if line.startswith("mapped_by"))
        assert mapped.split()[1] == str(page["mapped_by_count"]) and "[" not in human
        assert f"vm-b:{BASE_GFN:#x}" in human  # vm:gfn in hex, not a Python list

        assert main(["--socket", control, "audit"]) == 0
        human = capsys.readouterr().out
        assert "host frames (pagemap)" in human and "vm-b" in human
        # The same summary as --json: potential against realized sharing (a second
        # audit of running guests: the figures move by a few frames).
        line = next(x for x in human.splitlines() if x.strip().startswith("potential"))
        found = re.search(r"potential  (\d+) frames could be saved .* (\d+) are \(", line)
        assert found, line
        assert int(found[2]) >= NPAGES and int(found[1]) >= int(found[2]) - 16

    assert main(["--socket", control, "audit", "--gfn", "nosuch:1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nosuch" in err


def test_a_vm_with_merging_off_counts_as_opted_out(
    start_qemu: Callable[..., PlainQemu], app: tuple[AgentApp, str]
) -> None:
    agent, _ = app
    q = start_qemu("no-merge", "-m", "64", "-machine", "pc,mem-merge=off")
    agent.real.attach(q.name, q.pid, q.monitor)
    assert "no-merge" in agent.real.opted_out()
    [denied] = agent.real.nominate("no-merge", [BASE_GFN])
    assert isinstance(denied, SharingDenied)  # the guest cannot undo it (DENIED on the wire)
    assert all(not b.merge for b in agent.real.machine.guest("no-merge").blocks)  # type: ignore[union-attr]


def _hello(agent: AgentApp, name: str, dedup_opt_in: bool) -> None:
    """A HELLO from the guest of VM ``name``, fed to the agent's dispatcher."""
    capabilities = int(Capability.SHARING) | (int(Capability.DEDUP_OPT_IN) if dedup_opt_in else 0)
    request = wire.encode_request(
        1, wire.HelloRequest(wire.MIN_VERSION, wire.MAX_VERSION, capabilities, bytes(16))
    )
    [frame] = wire.FrameDecoder().feed(request)
    assert isinstance(frame, wire.Frame)
    guest = agent.agent.guests.setdefault(name, GuestState(name))
    [reply] = wire.FrameDecoder().feed(agent.dispatcher.handle(guest, frame))
    assert isinstance(reply, wire.Frame) and reply.status == Status.OK


def test_a_real_guest_that_does_not_consent_is_not_merged(
    start_qemu: Callable[..., PlainQemu],
    app: tuple[AgentApp, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """KSM merges a mergeable QEMU with any other: a guest that says HELLO without
    DEDUP_OPT_IN has its merging switched off, and neither `memd optin` nor a
    nominate switches it back on; its consent does."""
    agent, control = app
    q = start_qemu("vm-c", "-m", "64")
    agent.real.attach(q.name, q.pid, q.monitor)
    machine = agent.real.machine
    assert machine is not None

    def merging() -> bool:
        memdevs = query_memdev(q.monitor)
        on = all(b.merge for b in machine.guest("vm-c").blocks)
        assert not memdevs or all(m.merge for m in memdevs) == on  # QEMU agrees
        return on

    assert merging()  # attached by the operator, the guest has not spoken: KSM may merge
    _hello(agent, "vm-c", dedup_opt_in=False)
    assert not merging()
    [denied] = agent.real.nominate("vm-c", [BASE_GFN])
    assert isinstance(denied, SharingDenied)
    assert main(["--socket", control, "optin", "vm-c"]) == 1  # the guest's no wins
    assert "did not consent" in capsys.readouterr().err
    assert not merging()
    _hello(agent, "vm-c", dedup_opt_in=True)
    assert merging()
    assert main(["--socket", control, "optout", "vm-c"]) == 0  # the operator's no wins
    capsys.readouterr()
    assert not merging()
    _hello(agent, "vm-c", dedup_opt_in=True)
    assert not merging()
