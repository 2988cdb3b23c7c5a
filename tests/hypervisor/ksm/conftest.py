"""Fixtures for KSM steering on real guests: two identical memd-image guests attached to
one agent (QemuMachine + their memd channels), KSM knobs restored afterwards."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor import ksm
from hypervisor.vmimage import CHANNEL_NAME, ensure_image
from memd.agent.app import AgentApp
from tests.hypervisor.ksm.guests import VmMonitor, boot_many
from tests.hypervisor.vm.harness import GuestVM
from tests.support.loop_thread import LoopThread

needs_vm_root = [
    pytest.mark.vm,
    pytest.mark.root,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="pagemap PFNs and KSM sysfs need root"),
    pytest.mark.skipif(not ksm.available(), reason="kernel without KSM"),
]


@dataclass
class Rig:
    agent: AgentApp
    loop: LoopThread
    control: str
    vms: list[GuestVM]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Two guests booted from the same image, attached for RAM and channel; steering off.
    Every KSM knob is put back at teardown."""
    saved = ksm.snapshot()
    work = Path(tmp_path_factory.mktemp("ksm"))
    vms = boot_many(ensure_image(), work, ["ksm-a", "ksm-b"])
    loop = LoopThread()
    agent = AgentApp(budget_bytes=16 << 20)
    control = str(work / "control.sock")
    try:
        loop.run(agent.start(control))
        for vm in vms:
            agent.real.attach(vm.name, vm.pid, VmMonitor(vm))
            loop.run(
                agent.agent.add_channel(vm.name, str(vm.channel_sockets[CHANNEL_NAME]), "connect")
            )
        yield Rig(agent, loop, control, vms)
    finally:
        loop.run(agent.stop())
        loop.close()
        if agent.real.machine is not None:
            agent.real.machine.close()
        for vm in vms:
            vm.stop()
        ksm.restore(saved)
