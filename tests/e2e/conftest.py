"""Fixtures of the end-to-end tests: two libvirt TCG guests and a real agent process.

Both are module-scoped: booting costs seconds under TCG, and the tests of a module are
steps of one story (pools, sharing, agent restart, reboot) on the same two guests.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import ensure_image
from tests.hypervisor.vm.harness import qemu_available

from .cluster import URI, AgentProcess, LibvirtGuest, both, is_root

# The tests of a module are consecutive steps on the same guests: once one fails, the later
# ones would only fail for the same reason, so they are skipped and name the step that broke.
_FAILED_STEP: dict[str, str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        _FAILED_STEP.setdefault(str(item.path), item.name)
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    failed = _FAILED_STEP.get(str(item.path))
    if failed is not None:
        pytest.skip(f"an earlier step of this story failed: {failed}")


@dataclass
class Cluster:
    """Two running guests (``a``, ``b``) and the agent following them through libvirt."""

    agent: AgentProcess
    a: LibvirtGuest
    b: LibvirtGuest
    workdir: Path

    @property
    def guests(self) -> tuple[LibvirtGuest, LibvirtGuest]:
        return self.a, self.b


def _libvirt_connection() -> Any:
    if not is_root():
        pytest.skip("end-to-end tests need root (libvirtd, QEMU as libvirt-qemu)")
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup.sh --all)")
    libvirt = pytest.importorskip("libvirt")
    from hypervisor.libvirtd import ensure_libvirtd
    from memd.errors import BackendError

    try:
        ensure_libvirtd()
        return libvirt.open(URI)
    except (BackendError, libvirt.libvirtError) as err:
        pytest.skip(f"no libvirtd: {err}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    conn = _libvirt_connection()
    image = ensure_image()
    workdir = tmp_path_factory.mktemp("e2e")
    workdir.chmod(0o777)  # QEMU may run as libvirt-qemu and must create the console sockets
    prefix = f"memd-e2e-{os.getpid()}"
    guests: list[LibvirtGuest] = []
    agent = AgentProcess(workdir)
    try:
        for suffix in ("a", "b"):
            guests.append(LibvirtGuest(conn, image, workdir, f"{prefix}-{suffix}"))
        for guest in guests:
            guest.start()
        agent.start()  # while the guests boot: it finds them in its first libvirt scan
        both(guests[0], guests[1], lambda g: g.wait_ready())
        agent.wait_attached([g.name for g in guests])
        yield Cluster(agent, guests[0], guests[1], workdir)
    finally:
        try:
            if agent.process is not None:
                agent.stop()
        finally:
            agent.kill()
            with open(workdir / "guest-steps.txt", "w") as log:  # guest seconds per command
                for guest in guests:
                    log.writelines(
                        f"{guest.name} {label} {seconds}\n" for label, seconds in guest.step_log
                    )
            for guest in guests:
                guest.destroy()  # transient domains: destroy also undefines them
            conn.close()
