"""memd's libvirt ``qemu`` hook under a real libvirtd, and a refused migration on the source.

On the two-host bed (:mod:`tests.support.libvirt_pair`), host ``b`` gets memd's hook
(``memd libvirt-hook --install``) before its libvirtd starts; a ``memd serve --libvirt``
runs in each host (as in test_libvirt_migrate).  One TCG guest boots on ``a`` with its
memd channel and puts persistent pages, then, in turn:

1. ``virsh migrate --live --p2p`` without ``memd migrate``: b's libvirt refuses it with
   the hook's sentence; the guest runs on ``a`` with every page.
2. ``memd migrate --to b --arm-timeout 3``, then a libvirt migration that fails before
   anything starts (a destination URI nobody answers): libvirt reports nothing on the
   source, so memd gives up at its arming deadline: ABORT to ``b``, which holds nothing,
   the guest keeps every page on ``a``.
3. ``memd migrate --to b`` and ``virsh migrate``: the hook lets it through, the guest
   verifies its pages on ``b``, ``a`` holds nothing of it, both audits are clean.

And a memd guest that never said HELLO (a domain with a memd channel and no OS): `memd
migrate` moves it as an empty client, so the hook lets libvirt's migration through.

The hook runs as libvirtd's child inside ``b``'s namespaces and finds ``b``'s agent by the
control socket the installer wrote into it (the same inside path in both hosts, each
host's own socket).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vmimage import ImagePaths
from tests.migrate.guest_steps import check_pages, persist_script, pool_of, wait
from tests.migrate.libvirt_bed import memd_bed
from tests.support.libvirt_pair import (
    LibvirtHost,
    LibvirtPair,
    libvirt_pair,
    requires_libvirt_pair,
)
from tests.support.memd_agent import ROOT

pytestmark = requires_libvirt_pair()

PERSISTENT_PAGES = 1000


def install_hook(pair_private: Path, host: LibvirtHost) -> None:
    """``memd libvirt-hook --install`` into the host's /etc/libvirt/hooks (from outside),
    naming the host's agent socket as the host sees it."""
    hooks = host.outside("/etc/libvirt/hooks")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(pair_private / "memd.sock"),
            "libvirt-hook",
            "--install",
            "--hooks-dir",
            str(hooks),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    script = hooks / "qemu.d" / "memd"
    text = script.read_text()
    assert f"--socket {pair_private / 'memd.sock'}" in text, text
    # libvirt runs hooks with a clean environment: the suite's memd, not the machine's.
    first, rest = text.split("\n", 1)
    script.write_text(f"{first}\nexport PYTHONPATH={ROOT}\n{rest}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtPair]:
    base = tmp_path_factory.mktemp("lvh")
    private = base / "run"  # libvirt_pair's same-path private directory

    def hooks(host: LibvirtHost) -> None:
        if host.label == "b":
            install_hook(private, host)

    with libvirt_pair(base, before_libvirtd=hooks) as made:
        assert made.private == private
        yield made


def test_the_hook_refuses_a_memd_guest_until_memd_migrates_it(
    pair: LibvirtPair, vm_image: ImagePaths, tmp_path: Path
) -> None:
    import libvirt

    name = f"memd-lvh-{os.getpid()}"
    timings: dict[str, float] = {}
    with memd_bed(pair, tmp_path, name) as bed:
        a, b = bed.a, bed.b
        bed.start_agents()
        domain, shell = bed.boot_on_a(bed.guest_xml(vm_image, swap=False), timings)
        shell.write_file("/tmp/p.py", persist_script(PERSISTENT_PAGES).encode())

        def put() -> str:  # the guest's memd daemon may still be starting (then nothing is put)
            out = shell.run("python3 /tmp/p.py put", timeout=600).stdout
            return out if "POOL=" in out else ""

        pool = pool_of(wait(put, 120, "the guest put its pages"))

        # 1. virsh migrate without memd migrate: b's hook refuses it.
        start = time.monotonic()
        with pytest.raises(libvirt.libvirtError) as refused:
            pair.migrate(name, to=pair.b)
        timings["refused_s"] = round(time.monotonic() - start, 2)
        message = str(refused.value)
        assert "no memd transfer is arriving for it" in message, message
        assert f"run `memd migrate {name} --to {b.address}` on the source first" in message
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        with pytest.raises(libvirt.libvirtError):
            bed.conn_b.lookupByName(name)
        check_pages(shell, pool, PERSISTENT_PAGES)

        # 2. memd armed, libvirt's migration fails before it starts: memd gives up.
        armed = a.cli("migrate", name, "--to", b.address, "--arm-timeout", "3")
        assert armed["outcome"] == "armed", armed
        assert [r["guest"] for r in b.cli("status")["migrations"]["active"]] == [name]
        nobody = f"qemu+tcp://{pair.b.address}:1/system"  # b's address, no libvirtd there
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        with pytest.raises(libvirt.libvirtError):
            domain.migrateToURI3(nobody, {}, flags)
        start = time.monotonic()
        done = wait(lambda: a.cli("status")["migrations"]["finished"], 60, "memd gave up")
        timings["gave_up_s"] = round(time.monotonic() - start, 1)
        assert done[-1]["phase"] == "aborted", (done, a.tail())
        assert f"no libvirt migration of {name} began within 3 s" in done[-1]["error"]
        wait(lambda: not b.cli("status")["migrations"]["active"], 30, "b dropped the transfer")
        assert b.cli("status")["tmem"]["persistent_pages"] == 0
        assert domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        check_pages(shell, pool, PERSISTENT_PAGES)
        shell.close()

        # 3. memd migrate, then virsh migrate: the hook lets it through.
        armed = a.cli("migrate", name, "--to", b.address)
        assert armed["outcome"] == "armed", armed
        timings["virsh_migrate_s"] = round(pair.migrate(name, to=pair.b), 2)

        def second_finished() -> list[Any]:
            finished: list[Any] = a.cli("status")["migrations"]["finished"]
            return finished if len(finished) > 1 else []

        done = wait(second_finished, 300, "moved")
        assert done[-1]["phase"] == "done", (done, a.tail(), b.tail())
        assert bed.conn_b.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert name not in {c["client"] for c in a.cli("clients")}
        shell = bed.shell_on(pair.b)
        shell.attach(timeout=120)
        check_pages(shell, pool, PERSISTENT_PAGES)
        assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
        print(f"\nlibvirt hook timings: {timings}")


#: A memd guest whose daemon never says HELLO: a memd channel, no OS (QEMU runs its BIOS).
SILENT_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.memd.0'/></channel>
</devices></domain>"""


def test_a_memd_guest_that_never_said_hello_passes_the_hook_as_an_empty_client(
    pair: LibvirtPair, tmp_path: Path
) -> None:
    import libvirt

    name = f"memd-lvs-{os.getpid()}"
    with memd_bed(pair, tmp_path, name) as bed:
        a, b = bed.a, bed.b
        bed.start_agents(swap=False)
        bed.conn_a.createXML(SILENT_XML.format(name=name), 0)
        wait(lambda: any(g["name"] == name for g in a.cli("guests")), 60, "a attached it")
        assert name not in {c["client"] for c in a.cli("clients")}  # nothing held
        with pytest.raises(libvirt.libvirtError, match="no memd transfer is arriving"):
            pair.migrate(name, to=pair.b)
        armed = a.cli("migrate", name, "--to", b.address)
        assert armed["outcome"] == "armed" and armed["pages"] == 0, armed
        pair.migrate(name, to=pair.b)
        done = wait(lambda: a.cli("status")["migrations"]["finished"], 120, "moved")
        assert done[-1]["phase"] == "done", (done, a.tail(), b.tail())
        assert bed.conn_b.lookupByName(name).state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert name not in {c["client"] for c in a.cli("clients")}
        assert name in {c["client"] for c in b.cli("clients")}
        assert a.cli("audit")["clean"] and b.cli("audit")["clean"]
