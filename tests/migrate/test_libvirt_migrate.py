"""A libvirt live migration that a guest's tmem follows, on two simulated libvirt hosts.

Two hosts (:mod:`tests.support.libvirt_pair`: network, mount and UTS namespaces, each with
its own libvirtd), a ``memd serve --libvirt qemu:///system`` inside each following its own
libvirtd, both agents listening for migrations with mutual TLS on the hosts' private
addresses.  A TCG guest from vm-images boots on host ``a`` with its memd channel and a memd
swap disk (same socket path on both hosts, each host's own file); it puts persistent pages
through its channel and holds more memory than its RAM, so the kernel swaps to memd.  The
operator's two commands: ``memd migrate VM --to B:PORT`` on ``a`` (memd copies while the
guest runs and answers "armed"), then ``virsh migrate --live --p2p`` from ``a`` to ``b``.
memd follows libvirt's migration by its events (memd.migrate.libvirt); ``b`` holds the
guest's requests until memd's final delta is installed (memd.agent.holds).  On ``b`` the
guest then verifies every persistent page and every swapped byte; ``a``'s agent holds
nothing of it; both audits are clean."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.domain_xml import swap_disk_xml
from hypervisor.vmimage import ImagePaths, render_domain_xml
from tests.hypervisor.vm.console import GuestShell
from tests.migrate.test_migrate_guest import HOLD, PAGE
from tests.support.libvirt_pair import LibvirtHost, LibvirtPair, libvirt_pair, unavailable_reason
from tests.support.tls import make_pki

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
    pytest.mark.vm,
    pytest.mark.libvirt,
    pytest.mark.root,
]

ROOT = Path(__file__).resolve().parents[2]
PORT = 7700
RAM_MIB = 128
HOLD_MIB = 160
PERSISTENT_PAGES = 1000
#: Wall-clock seconds of each phase, printed at the end (pytest -s).
TIMINGS: dict[str, Any] = {}

#: Puts (argv[1] == "put") or verifies ("check POOL") persistent pages via the guest daemon.
PERSIST = (
    "import sys\nsys.path.insert(0, '/usr/lib/memd')\n"
    + PAGE
    + r"""
from memd.guest.cli import daemon_client
n = __PAGES__
c = daemon_client()
with c:
    if sys.argv[1] == "put":
        pool = c.new_pool(persistent=True)
        for s in range(0, n, 64):
            c.put_batch(pool, [(5, i, page(i)) for i in range(s, min(n, s + 64))])
        print("POOL=%d" % pool)
    else:
        pool = int(sys.argv[2])
        bad = 0
        for s in range(0, n, 64):
            got = c.get_batch(pool, [(5, i) for i in range(s, min(n, s + 64))])
            bad += sum(1 for i, g in zip(range(s, n), got) if g != page(i))
        print("PERSIST pages=%d bad=%d" % (n, bad))
""".replace("__PAGES__", str(PERSISTENT_PAGES))
)


class HostAgent:
    """``memd serve --libvirt qemu:///system`` inside one host of the pair."""

    def __init__(self, pair: LibvirtPair, host: LibvirtHost, tls: Path, workdir: Path) -> None:
        self.pair, self.host, self.tls = pair, host, tls
        self.socket = pair.private / "memd.sock"  # inside path: each host its own
        self.swap = pair.private / "vm.swap"
        self.log = workdir / f"agent-{host.label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def start(self, guest: str, *, swap: bool = True) -> None:
        argv = [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(self.socket),
            "serve",
            "--store",
            str(self.pair.private / f"store-{guest}"),  # each test its own
            "--budget",
            "512M",
            "--spill-dir",
            "",
            "--migrate-listen",
            self.address,
            "--tls-dir",
            str(self.tls),
            "--libvirt",
            "qemu:///system",
            *(["--swap", f"{guest}={self.swap}:512M"] if swap else []),
            "--log-json",
            "--log-level",
            "debug",
        ]
        env = {**self.pair.memd_env(), "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.process = self.host.popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(subprocess.CalledProcessError, json.JSONDecodeError):
                if self.cli("status")["migrations"]["listening"]:
                    return
            assert self.process.poll() is None and time.monotonic() < deadline, self.tail()
            time.sleep(0.2)

    def cli(self, *args: str, timeout: float = 300) -> Any:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "memd.cli",
                "--socket",
                str(self.host.outside(self.socket)),
                *args,
                "--json",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return json.loads(out.stdout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtPair]:
    with libvirt_pair(tmp_path_factory.mktemp("lvm")) as made:
        yield made
    print(f"\nlibvirt migration timings: {TIMINGS}")


def wait(what: Any, timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {message}"
        time.sleep(0.5)


def verify(shell: GuestShell, pool: int) -> None:
    """The guest checks its memory (swapped in from memd) and its persistent pages."""
    shell.check("touch /tmp/go")
    out = wait(
        lambda: "rc=" in (o := shell.run("cat /tmp/hold.out", timeout=300).stdout) and o,
        1800,
        "the guest verified its memory",
    )
    assert f"HOLD pages={HOLD_MIB * 256} bad=0" in out and "rc=0" in out, out
    out = shell.check(f"python3 /tmp/p.py check {pool}", timeout=600)
    assert f"PERSIST pages={PERSISTENT_PAGES} bad=0" in out, out
    dmesg = shell.check("dmesg", timeout=120)
    assert "I/O error" not in dmesg and "Read-error" not in dmesg, dmesg[-2000:]


@pytest.mark.parametrize("scenario", ["moved", "cancelled", "destination-killed"])
def test_a_libvirt_migration_takes_the_guests_tmem_along(
    pair: LibvirtPair, vm_image: ImagePaths, tmp_path: Path, scenario: str
) -> None:
    """moved: the guest verifies everything on b.  cancelled (``virsh domjobabort`` half
    way) and destination-killed (b's agent SIGKILLed half way; memd cancels libvirt's
    migration): the guest keeps running on a and verifies everything there."""
    import libvirt

    name = f"memd-lvm-{os.getpid()}-{scenario}"
    tls = make_pki(tmp_path / "pki", server_addresses=[pair.a.address, pair.b.address])
    a = HostAgent(pair, pair.a, tls, tmp_path)
    b = HostAgent(pair, pair.b, tls, tmp_path)
    console = pair.private / "c.sock"
    xml = render_domain_xml(image=vm_image, name=name, console_socket=console, memory_mib=RAM_MIB)
    xml = xml.replace("</devices>", swap_disk_xml(str(a.swap), "vda", 5) + "</devices>")
    conn_a, conn_b = pair.a.connect(), pair.b.connect()
    shell: GuestShell | None = None
    timings: dict[str, float] = {}
    TIMINGS[scenario] = timings
    try:
        a.start(name)
        b.start(name)
        start = time.monotonic()
        domain = conn_a.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        shell = GuestShell(pair.a.outside(console), tmp_path / "console-a.log")
        domain.resume()
        shell.wait_ready(0, 300)
        timings["boot_s"] = round(time.monotonic() - start, 1)
        shell.check("mkswap /dev/vda && swapon -d /dev/vda")
        shell.write_file("/tmp/p.py", PERSIST.encode())
        shell.write_file("/tmp/h.py", HOLD.encode())
        out = shell.check("python3 /tmp/p.py put", timeout=600)
        pool = int(re.search(r"POOL=(\d+)", out).group(1))  # type: ignore[union-attr]
        start = time.monotonic()
        shell.check(
            f"(python3 /tmp/h.py {HOLD_MIB} > /tmp/hold.out 2>&1; echo rc=$? >> /tmp/hold.out) &"
        )
        running = shell
        wait(
            lambda: "FILLED" in running.run("cat /tmp/hold.out", timeout=300).stdout,
            1200,
            "the guest filled its memory",
        )
        timings["fill_s"] = round(time.monotonic() - start, 1)
        swapped = next(g for g in a.cli("guests") if g["name"] == name)["swap"]["pages"]
        assert swapped > (HOLD_MIB - RAM_MIB) * 256 // 2, swapped  # the disk is in use

        # The operator, on host a: memd first, then libvirt.
        start = time.monotonic()
        armed = a.cli("migrate", name, "--to", b.address)
        assert armed["outcome"] == "armed", armed
        timings["memd_armed_s"] = round(time.monotonic() - start, 2)
        if scenario == "moved":
            moved_a_to_b(pair, a, b, name, pool, console, tmp_path, timings)
            return
        failure: list[libvirt.libvirtError] = []

        def migrate() -> None:  # 4 MiB/s: still copying when it is stopped
            try:
                pair.migrate(name, to=pair.b, params={libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 4})
            except libvirt.libvirtError as err:
                failure.append(err)

        worker = threading.Thread(target=migrate)
        worker.start()
        try:
            wait(
                lambda: domain.jobStats().get("memory_processed", 0) > 1 << 20,
                60,
                "libvirt's migration copies",
            )
            if scenario == "cancelled":
                domain.abortJob()  # = virsh domjobabort
            else:
                assert b.process is not None
                b.process.kill()  # the destination agent dies half way
                b.process.wait()
                b.process = None
        finally:
            worker.join(120)
        assert failure, "libvirt's migration completed although it was stopped"
        assert failure[0].get_error_code() == libvirt.VIR_ERR_OPERATION_ABORTED, failure[0]
        done = wait(lambda: a.cli("status")["migrations"]["finished"], 120, "memd gave up")
        assert done[-1]["phase"] == "aborted", (done, a.tail())
        if scenario == "destination-killed":
            assert "libvirt's migration was cancelled" in a.log.read_text(), a.tail()
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        with pytest.raises(libvirt.libvirtError):
            conn_b.lookupByName(name)
        start = time.monotonic()
        verify(shell, pool)
        timings["verify_on_a_s"] = round(time.monotonic() - start, 1)
        if b.process is None:
            b.start(name)  # back: it drops what the killed agent had staged
        wait(
            lambda: b.cli("status")["tmem"]["persistent_pages"] == 0,
            60,
            "the destination holds nothing",
        )
        assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
    finally:
        if shell is not None:
            shell.close()
        for conn in (conn_a, conn_b):
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).destroy()
            conn.close()
        a.stop()
        b.stop()


def moved_a_to_b(
    pair: LibvirtPair,
    a: HostAgent,
    b: HostAgent,
    name: str,
    pool: int,
    console: Path,
    tmp_path: Path,
    timings: dict[str, float],
) -> None:
    import libvirt

    timings["virsh_migrate_s"] = round(pair.migrate(name, to=pair.b), 2)
    done = wait(lambda: a.cli("status")["migrations"]["finished"], 300, "memd's transfer")
    assert done[-1]["phase"] == "done", (done, a.tail(), b.tail())
    timings["memd_switchover_ms"] = done[-1].get("switchover_ms") or -1
    timings["pages_moved"] = done[-1]["pages"]
    conn_b = pair.b.connect()
    try:
        assert conn_b.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn_b.close()
    assert a.cli("status")["tmem"]["persistent_pages"] == 0
    assert name not in {c["client"] for c in a.cli("clients")}
    shell = GuestShell(pair.b.outside(console), tmp_path / "console-b.log")
    try:
        shell.attach(timeout=120)
        start = time.monotonic()
        verify(shell, pool)
        timings["verify_on_b_s"] = round(time.monotonic() - start, 1)
    finally:
        shell.close()
    assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
    logged = b.log.read_text(errors="replace")
    assert "migrate-hold-expired" not in logged  # no request of the guest waited 60 s
    timings["requests_held"] = logged.count('"migrate-hold"')
