"""memd on the two-host libvirt bed (:mod:`tests.support.libvirt_pair`), as the libvirt
migration tests (test_libvirt_migrate, test_libvirt_hook_bed) use it: a ``memd serve
--libvirt qemu:///system`` in each host, listening for migrations with mutual TLS on the
hosts' private addresses, the test's libvirt connections to both hosts, and a TCG guest
booted on host ``a`` with its console in the pair's same-path private directory.

:func:`memd_bed` owns all of it and releases it on exit, whatever happened: the guest's
console shells closed, the guest destroyed on either host, both agents stopped.

State: a bed belongs to the one test thread that made it.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypervisor.domain_xml import swap_disk_xml
from hypervisor.vmimage import ImagePaths, render_domain_xml
from tests.hypervisor.vm.console import GuestShell
from tests.support.libvirt_pair import LibvirtHost, LibvirtPair
from tests.support.memd_agent import ROOT, AgentProcess, serve_argv
from tests.support.tls import make_pki

PORT = 7700
#: The guest's RAM.
RAM_MIB = 128


class HostAgent(AgentProcess):
    """``memd serve --libvirt qemu:///system`` inside one host of the pair."""

    def __init__(self, pair: LibvirtPair, host: LibvirtHost, tls: Path, workdir: Path) -> None:
        socket = pair.private / "memd.sock"  # inside path: each host its own
        log = workdir / f"agent-{host.label}.log"
        super().__init__(log, host.outside(socket), f"host {host.label}")
        self.pair, self.host, self.tls = pair, host, tls
        self.socket = socket
        self.swap = pair.private / "vm.swap"

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def start(self, guest: str, *, swap: bool = True) -> None:
        argv = serve_argv(
            self.socket,
            self.pair.private / f"store-{guest}",  # each test its own
            self.address,
            self.tls,
            "--libvirt",
            "qemu:///system",
            *(["--swap", f"{guest}={self.swap}:512M"] if swap else []),
        )
        env = {**self.pair.memd_env(), "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.process = self.host.popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_listening(60)


class Bed:
    """The agents, connections and console shells of one test's guest ``name``."""

    def __init__(self, pair: LibvirtPair, workdir: Path, name: str) -> None:
        self.pair, self.workdir, self.name = pair, workdir, name
        tls = make_pki(workdir / "pki", server_addresses=[pair.a.address, pair.b.address])
        self.a = HostAgent(pair, pair.a, tls, workdir)
        self.b = HostAgent(pair, pair.b, tls, workdir)
        self.console = pair.private / "c.sock"  # inside path: each host binds its own file
        self.conn_a, self.conn_b = pair.a.connect(), pair.b.connect()
        self.shells: list[GuestShell] = []

    def guest_xml(self, image: ImagePaths, *, swap: bool) -> str:
        """The guest's domain: RAM_MIB, its console, memd's channel; with ``swap``, a's
        agent's swap disk as /dev/vda."""
        xml = render_domain_xml(
            image=image, name=self.name, console_socket=self.console, memory_mib=RAM_MIB
        )
        if swap:
            disk = swap_disk_xml(str(self.a.swap), "vda", 5)
            xml = xml.replace("</devices>", disk + "</devices>")
        return xml

    def start_agents(self, *, swap: bool = True) -> None:
        """Both hosts' agents, serving the guest (``swap``: and its swap disk)."""
        self.a.start(self.name, swap=swap)
        self.b.start(self.name, swap=swap)

    def boot_on_a(self, xml: str, timings: dict[str, float]) -> tuple[Any, GuestShell]:
        """Start the guest on host ``a`` (paused until its console is connected, so nothing it
        prints is missed) and wait for its shell, the seconds in ``timings["boot_s"]``; the
        libvirt domain and the shell."""
        import libvirt

        start = time.monotonic()
        domain = self.conn_a.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        shell = self.shell_on(self.pair.a)
        domain.resume()
        shell.wait_ready(0, 300)
        timings["boot_s"] = round(time.monotonic() - start, 1)
        return domain, shell

    def shell_on(self, host: LibvirtHost) -> GuestShell:
        """A console shell to the guest where it runs on ``host`` (closed at the bed's exit)."""
        shell = GuestShell(host.outside(self.console), self.workdir / f"console-{host.label}.log")
        self.shells.append(shell)
        return shell

    def close(self) -> None:
        import libvirt

        try:
            for shell in self.shells:
                shell.close()
            for conn in (self.conn_a, self.conn_b):
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(self.name).destroy()
                conn.close()
        finally:
            self.a.stop()
            self.b.stop()


@contextlib.contextmanager
def memd_bed(pair: LibvirtPair, workdir: Path, name: str) -> Iterator[Bed]:
    bed = Bed(pair, workdir, name)
    try:
        yield bed
    finally:
        bed.close()
