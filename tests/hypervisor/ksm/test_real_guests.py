"""KSM steering and guest sharing requests on two real TCG guests from the memd image.

The guests boot from the same kernel and initramfs, so much of their RAM is identical.
Steering (through the CLI) must make KSM merge it — the audit shows frames mapped by
both QEMUs, with equal PFNs.  Then each guest, through its real virtio-serial channel,
nominates a buffer of its own (gfns learnt from its /proc/self/pagemap), sees it
SHARED, writes to it, and sees it unshared; the host's audit follows.
"""

from __future__ import annotations

import ast
import json
import time

import numpy as np
import pytest

from memd.cli import main
from sharing.consent import GuestWord
from tests.hypervisor.ksm.conftest import Rig, needs_vm_root

pytestmark = needs_vm_root

NPAGES = 32

# Runs inside the guest (python3-minimal + memd.guest).  Phases are driven by files:
# /tmp/go → write the pages; /tmp/exit → end (the buffer stays mapped until then).
GUEST_SCRIPT = r"""
import os, time
from memd.guest.cli import daemon_client
from memd.guest.client import GuestClient
N = @NPAGES@
# python3-minimal has neither mmap nor ctypes: find a bytearray's buffer through
# /proc/self/mem (CPython's PyByteArrayObject keeps its data pointer at offset 32).
ba = bytearray((N + 1) * 4096)
with open("/proc/self/mem", "rb") as m:
    m.seek(id(ba) + 32)
    ptr = int.from_bytes(m.read(8), "little")
off = -ptr % 4096
base = ptr + off
for i in range(N):
    ba[off + i * 4096:off + (i + 1) * 4096] = (
        (b"memd-ksm-test page %05d " % i) * 200).ljust(4096, b"#")[:4096]
with open("/proc/self/mem", "rb") as m:
    m.seek(base)
    assert m.read(N * 4096) == bytes(ba[off:off + N * 4096]), "wrong buffer address"
with open("/proc/self/pagemap", "rb") as f:
    f.seek(base // 4096 * 8)
    raw = f.read(N * 8)
gfns = [int.from_bytes(raw[i * 8:i * 8 + 8], "little") & ((1 << 55) - 1) for i in range(N)]
out = {"gfns": gfns}
# The image's guest daemon owns the port: go through it (as memd-guest does), or open the
# port when no daemon runs.
with (daemon_client() or GuestClient.for_port()) as c:
    out["nominate"] = [[int(r.status), r.handle] for r in c.nominate(gfns)]
    deadline = time.time() + 90
    while True:
        q = c.share_query(gfns)
        if all(s.state == 3 for s in q) or time.time() > deadline:
            break
        time.sleep(0.5)
    out["query"] = [[int(s.state), s.share_count] for s in q]
    open("/tmp/ksm1.txt", "w").write(repr(out))
    while not os.path.exists("/tmp/go"):
        time.sleep(0.1)
    c.about_to_write(gfns[0])           # the protocol way: announce, then write
    ba[off:off + 4] = b"XXXX"
    ba[off + 4096:off + 4100] = b"YYYY"  # written without notice: the host still sees it
    out["after"] = [[int(s.state), s.share_count] for s in c.share_query(gfns[:3])]
    open("/tmp/ksm2.txt", "w").write(repr(out))
while not os.path.exists("/tmp/exit"):
    time.sleep(0.1)
""".replace("@NPAGES@", str(NPAGES))


# The image's guest daemon says HELLO without DEDUP_OPT_IN, and a guest that does not
# consent is not merged with other guests (sharing.consent): make it consent.  busybox
# init rereads /etc/inittab on SIGHUP and starts the new entry; the old daemon, no
# longer listed, is stopped and not respawned.
CONSENT_SCRIPT = r"""
sed -i 's|memd-guest daemon >>|memd-guest --dedup daemon >>|' /etc/inittab
kill -HUP 1
sleep 1
for p in /proc/[0-9]*; do
  c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
  case "$c" in
    *"memd-guest daemon"*) kill "${p#/proc/}" ;;  # not "memd-guest --dedup daemon"
  esac
done
"""


@pytest.fixture(scope="module", autouse=True)
def consenting(rig: Rig) -> None:
    for vm in rig.vms:
        vm.write_file("/tmp/consent.sh", CONSENT_SCRIPT.encode())
        vm.check("sh /tmp/consent.sh")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(rig.agent.consent.word(vm.name) is GuestWord.CONSENTS for vm in rig.vms):
            break
        time.sleep(0.5)
    else:
        words = {vm.name: rig.agent.consent.word(vm.name) for vm in rig.vms}
        pytest.fail(f"the guests' daemons did not come back consenting: {words}")
    machine = rig.agent.real.machine
    assert machine is not None
    assert all(all(b.merge for b in g.blocks) for g in machine.guests())


def _audit(rig: Rig, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    main(["--socket", rig.control, "audit", "--json"])
    report: dict = json.loads(capsys.readouterr().out)  # type: ignore[type-arg]
    return report


def _wait_file(vm, path: str, timeout: float) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = vm.run(f"cat {path}")
        if r.status == 0 and r.stdout.strip():
            return ast.literal_eval(r.stdout)  # type: ignore[no-any-return]
        if "Traceback" in vm.run("cat /tmp/ksm.log").stdout:
            break
        time.sleep(0.5)
    log = vm.run("cat /tmp/ksm.log").stdout
    raise AssertionError(f"{vm.name}: {path} did not appear; guest log:\n{log}")


def test_steering_merges_identical_guests_and_audit_confirms_by_pfn(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", rig.control, "ksm", "--steer", "on", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["steering"] is True
    agent = rig.agent
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        step = agent.real.steering.last if agent.real.steering else None
        if (
            step
            and step.potential_saved_frames
            and step.realized_saved_frames >= (0.9 * step.potential_saved_frames)
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"realized sharing stayed below 90% of potential: {step}")
    assert main(["--socket", rig.control, "ksm", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["knobs"]["run"] == 1
    report = _audit(rig, capsys)
    realized = report["realized"]
    vms = realized["matrix"]["vms"]
    cross = realized["matrix"]["frames"][vms.index("ksm-a")][vms.index("ksm-b")]
    assert cross > 1000, realized["matrix"]
    assert realized["potential"]["potential_saved_frames"] > 0
    assert (
        realized["potential"]["realized_saved_frames"]
        >= 0.8 * realized["potential"]["potential_saved_frames"]
    )
    # Confirm by pagemap directly: frames both QEMUs map, at equal PFNs.
    assert agent.real.machine is not None
    pa, pb = (agent.real.machine.p2m(agent.real.machine.guest(n).domid) for n in ("ksm-a", "ksm-b"))
    both = np.intersect1d(pa[pa >= 0], pb[pb >= 0])
    assert len(both) > 1000
    assert report["clean"], report


def test_guest_nominates_sees_shared_then_unshares_by_writing(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = rig.agent
    if agent.real.steering is None:  # run alone: steering drives the merge
        rig.loop.run(agent.real.start_steering())
    for vm in rig.vms:
        vm.write_file("/tmp/ksm.py", GUEST_SCRIPT.encode())
        vm.check("python3 /tmp/ksm.py > /tmp/ksm.log 2>&1 &")
    results = {vm.name: _wait_file(vm, "/tmp/ksm1.txt", 150) for vm in rig.vms}
    a, b = results["ksm-a"], results["ksm-b"]
    for r in (a, b):
        assert [s for s, _ in r["nominate"]] == [0] * NPAGES  # Status.OK
        handles = [h for _, h in r["nominate"]]
        assert len(set(handles)) == NPAGES and min(handles) > 0
        assert all(state == 3 and count >= 2 for state, count in r["query"]), (
            r["query"],
            agent.real.steering.last if agent.real.steering else None,
        )
    assert agent.real.machine is not None
    da, db = (agent.real.machine.guest(n).domid for n in ("ksm-a", "ksm-b"))
    ga, gb = np.array(a["gfns"]), np.array(b["gfns"])
    assert (agent.real.machine.p2m(da)[ga] == agent.real.machine.p2m(db)[gb]).all()  # equal PFNs
    report = _audit(rig, capsys)
    nominated = report["realized"]["nominated"]
    assert nominated["entries"] == 2 * NPAGES and nominated["shared"] == 2 * NPAGES

    rig.vms[0].check("touch /tmp/go")
    after = _wait_file(rig.vms[0], "/tmp/ksm2.txt", 60)["after"]
    assert after[0] == [1, 1]  # PRIVATE: announced with about_to_write, then written
    assert after[1] == [2, 1]  # NOMINATED: written without notice, no longer merged
    assert after[2][0] == 3  # untouched: still SHARED
    pa, pb = agent.real.machine.p2m(da), agent.real.machine.p2m(db)
    assert pa[ga[0]] != pb[gb[0]] and pa[ga[1]] != pb[gb[1]] and pa[ga[2]] == pb[gb[2]]
    report = _audit(rig, capsys)
    nominated = report["realized"]["nominated"]
    assert nominated["entries"] == 2 * NPAGES - 1  # gfn 0 of ksm-a retired its handle
    # a's gfn 1 was written (a new frame: unshared); b's gfns 0 and 1 lost their twins:
    # unshared, or "nominated" when KSM had kept b's own frame as the merged page.
    assert nominated["shared"] == 2 * NPAGES - 4
    assert nominated["unshared"] >= 1 and nominated["unshared"] + nominated["nominated"] == 3
    row = [s for s in nominated["sample"] if s["vm"] == "ksm-a" and s["gfn"] == a["gfns"][1]]
    assert row and row[0]["state"] == "unshared"
    for vm in rig.vms:
        vm.check("touch /tmp/exit")


def test_optout_warns_and_unmerges(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    agent = rig.agent
    assert agent.real.machine is not None
    db = agent.real.machine.guest("ksm-b").domid
    assert main(["--socket", rig.control, "optout", "ksm-b"]) == 0
    captured = capsys.readouterr()
    assert "re-expands its memory by" in captured.err and captured.err.count("\n") == 1
    pa = agent.real.machine.p2m(agent.real.machine.guest("ksm-a").domid)
    pb = agent.real.machine.p2m(db)
    assert len(np.intersect1d(pa[pa >= 0], pb[pb >= 0])) < 100  # pc.ram un-merged at once
    assert main(["--socket", rig.control, "ksm", "--step", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["vms"]["ksm-b"]["merge"] is False
    assert main(["--socket", rig.control, "optin", "ksm-b"]) == 0
    capsys.readouterr()
    assert main(["--socket", rig.control, "optout", "nosuch"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
