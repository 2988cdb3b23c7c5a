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

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import ImagePaths
from tests.migrate import guest_steps
from tests.migrate.guest_steps import Shell, wait
from tests.migrate.libvirt_bed import RAM_MIB, Bed, memd_bed
from tests.support.libvirt_pair import LibvirtPair, libvirt_pair, requires_libvirt_pair

pytestmark = requires_libvirt_pair()

HOLD_MIB = 160
PERSISTENT_PAGES = 1000
#: Wall-clock seconds of each phase, printed at the end (pytest -s).
TIMINGS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtPair]:
    with libvirt_pair(tmp_path_factory.mktemp("lvm")) as made:
        yield made
    print(f"\nlibvirt migration timings: {TIMINGS}")


def verify(shell: Shell, pool: int) -> None:
    """The guest checks its memory (swapped in from memd) and its persistent pages."""
    guest_steps.verify(shell, pool, hold_mib=HOLD_MIB, pages=PERSISTENT_PAGES)


@pytest.mark.parametrize("scenario", ["moved", "cancelled", "destination-killed"])
def test_a_libvirt_migration_takes_the_guests_tmem_along(
    pair: LibvirtPair, vm_image: ImagePaths, tmp_path: Path, scenario: str
) -> None:
    """moved: the guest verifies everything on b.  cancelled (``virsh domjobabort`` half
    way) and destination-killed (b's agent SIGKILLed half way; memd cancels libvirt's
    migration): the guest keeps running on a and verifies everything there."""
    import libvirt

    name = f"memd-lvm-{os.getpid()}-{scenario}"
    timings: dict[str, float] = {}
    TIMINGS[scenario] = timings
    with memd_bed(pair, tmp_path, name) as bed:
        a, b = bed.a, bed.b
        bed.start_agents()
        domain, shell = bed.boot_on_a(bed.guest_xml(vm_image, swap=True), timings)
        guest_steps.swap_on_memd_disk(shell)
        pool = guest_steps.put_persistent_pages(shell, PERSISTENT_PAGES)
        start = time.monotonic()
        guest_steps.fill_memory(shell, HOLD_MIB)
        timings["fill_s"] = round(time.monotonic() - start, 1)
        swapped = next(g for g in a.cli("guests") if g["name"] == name)["swap"]["pages"]
        guest_steps.assert_swap_in_use(swapped, HOLD_MIB, RAM_MIB)

        # The operator, on host a: memd first, then libvirt.
        start = time.monotonic()
        armed = a.cli("migrate", name, "--to", b.address)
        assert armed["outcome"] == "armed", armed
        timings["memd_armed_s"] = round(time.monotonic() - start, 2)
        if scenario == "moved":
            moved_a_to_b(bed, pool, timings)
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
                b.kill()  # the destination agent dies half way
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
            bed.conn_b.lookupByName(name)
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


def moved_a_to_b(bed: Bed, pool: int, timings: dict[str, float]) -> None:
    import libvirt

    pair, a, b, name = bed.pair, bed.a, bed.b, bed.name
    timings["virsh_migrate_s"] = round(pair.migrate(name, to=pair.b), 2)
    done = wait(lambda: a.cli("status")["migrations"]["finished"], 300, "memd's transfer")
    assert done[-1]["phase"] == "done", (done, a.tail(), b.tail())
    timings["memd_switchover_ms"] = done[-1].get("switchover_ms") or -1
    timings["pages_moved"] = done[-1]["pages"]
    assert bed.conn_b.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert a.cli("status")["tmem"]["persistent_pages"] == 0
    assert name not in {c["client"] for c in a.cli("clients")}
    shell = bed.shell_on(pair.b)
    shell.attach(timeout=120)
    start = time.monotonic()
    verify(shell, pool)
    timings["verify_on_b_s"] = round(time.monotonic() - start, 1)
    assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
    logged = b.log.read_text(errors="replace")
    assert "migrate-hold-expired" not in logged  # no request of the guest waited 60 s
    timings["requests_held"] = logged.count('"migrate-hold"')
