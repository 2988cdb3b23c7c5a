"""The one guest launcher (hypervisor/vmlaunch.py): its command line and sockets without
QEMU, and a real boot of the memd image (TCG) when QEMU is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hypervisor.vmimage import CHANNEL_NAME, READY_MARKER, ImagePaths
from hypervisor.vmlaunch import LaunchedVm, boot_many
from memd.errors import BackendError

_FAKE_IMAGE = ImagePaths(
    Path("/nonexistent/bzImage"),
    Path("/nonexistent/initrd"),
    Path("/nonexistent/manifest"),
    "0" * 16,
)


def test_sockets_live_in_the_workdir_and_reach_the_command_line(tmp_path: Path) -> None:
    vm = LaunchedVm(
        _FAKE_IMAGE,
        tmp_path / "w",
        name="g1",
        memory_mib=128,
        append="quiet",
        nbd_disks=(tmp_path / "disk.sock",),
    )
    assert vm.channel_sockets == {CHANNEL_NAME: tmp_path / "w" / "g1.memd.sock"}
    argv = " ".join(vm.argv())
    for path in (
        vm.console_socket,
        vm.qmp_socket,
        *vm.channel_sockets.values(),
        tmp_path / "disk.sock",
    ):
        assert str(path) in argv
    assert "-S" in vm.argv() and "quiet" in argv  # paused: the console attaches first
    other = LaunchedVm(_FAKE_IMAGE, tmp_path, name="g2", channels={"p.0": tmp_path / "p"})
    other_argv = " ".join(other.argv())
    assert str(tmp_path / "p") in other_argv and "memd.sock" not in other_argv


def test_a_guest_that_is_not_running_says_so(tmp_path: Path) -> None:
    vm = LaunchedVm(_FAKE_IMAGE, tmp_path, name="idle")
    with pytest.raises(BackendError, match="idle is not running"):
        _ = vm.pid
    with pytest.raises(BackendError, match="idle is not running"):
        _ = vm.monitor
    vm.stop()  # nothing to stop: fine, and twice
    vm.stop()
    assert not vm.running


def test_a_qemu_that_fails_to_start_is_one_sentence_with_its_log(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    vm = LaunchedVm(_FAKE_IMAGE, tmp_path, name="broken")
    with pytest.raises(BackendError, match="QEMU for broken exited with"):
        vm.boot(timeout=30)
    assert not vm.running


def test_boot_many_boots_real_guests_and_stop_ends_them(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    from hypervisor.vmimage import ensure_image

    vms = boot_many(ensure_image(), tmp_path, ["la", "lb"], memory_mib=128)
    try:
        for vm in vms:
            assert READY_MARKER in vm.console_log.read_text(errors="replace")
            assert vm.monitor.execute("query-status")["status"] == "running"
            assert os.path.exists(f"/proc/{vm.pid}")
        pids = [vm.pid for vm in vms]
    finally:
        for vm in vms:
            vm.stop()
    for pid in pids:
        assert (
            not os.path.exists(f"/proc/{pid}")
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
