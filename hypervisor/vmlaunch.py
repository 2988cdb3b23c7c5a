"""Launching a vm-images guest under plain QEMU (TCG, no libvirt): the one launcher.

Overview.  A :class:`LaunchedVm` is one QEMU process started from
:func:`hypervisor.vmimage.qemu_argv`, and the unix sockets it listens on in a work
directory: the serial console, the QMP socket (held by one
:class:`hypervisor.qmp.QmpMonitor`, its only client — the monitor
:class:`~hypervisor.qemu_machine.QemuMachine` attaches through), and the host end of
each virtio-serial port.  The benchmarks and the real-VM tests (tests/hypervisor/vm/harness.py,
which adds a shell on the console) both launch their guests here.

Boot order.  QEMU starts paused (``-S``): :meth:`LaunchedVm.launch` waits for its
sockets and connects QMP; the caller attaches to the console, *then*
:meth:`LaunchedVm.resume` runs the guest — a serial chardev without a client drops
output, and the ready marker must not be lost.  :meth:`LaunchedVm.boot` does all of it
for a guest nobody types into: it reads the console until
:data:`hypervisor.vmimage.READY_MARKER` (copying it to the console log) and closes it.
The guest reboots in place (no ``-no-reboot``): QEMU, its pid and its sockets stay.

Threads.  A LaunchedVm belongs to the thread that starts and stops it; its monitor is
a QmpMonitor (thread-safe as that class says).  :func:`boot_many` boots several guests
in threads of its own: TCG boots are CPU-bound, but their waits overlap.

Errors are memd's BackendError family, one sentence each.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from hypervisor.qmp import QmpMonitor
from hypervisor.vmimage import CHANNEL_NAME, READY_MARKER, ImagePaths, qemu_argv
from memd.errors import BackendError

#: Seconds QEMU may take to create its sockets, and the QMP monitor's per-command timeout
#: (TCG guests on a loaded host answer slowly).
SOCKET_TIMEOUT = 20.0
QMP_TIMEOUT = 30.0


class LaunchedVm:
    """One TCG guest booted from ``image``, its sockets and logs in ``workdir``.

    ``channels`` maps virtio-serial port names to host socket paths (default: the memd
    port at ``<workdir>/<name>.memd.sock``); ``nbd_disks`` are virtio disks served over
    NBD on those sockets; ``append`` extends the kernel command line.
    """

    def __init__(
        self,
        image: ImagePaths,
        workdir: Path,
        *,
        name: str,
        memory_mib: int = 256,
        append: str = "",
        channels: Mapping[str, Path] | None = None,
        nbd_disks: Sequence[Path] = (),
    ) -> None:
        self.image = image
        self.name = name
        self.memory_mib = memory_mib
        self.append = append
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.console_socket = workdir / f"{name}.console.sock"
        self.qmp_socket = workdir / f"{name}.qmp.sock"
        self.console_log = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self.channel_sockets: dict[str, Path] = dict(
            channels if channels is not None else {CHANNEL_NAME: workdir / f"{name}.memd.sock"}
        )
        self.nbd_disks = tuple(nbd_disks)
        self._process: subprocess.Popen[bytes] | None = None
        self._monitor: QmpMonitor | None = None

    def argv(self) -> list[str]:
        return qemu_argv(
            self.image,
            name=self.name,
            memory_mib=self.memory_mib,
            console_socket=self.console_socket,
            qmp_socket=self.qmp_socket,
            channels=self.channel_sockets,
            append=self.append,
            start_paused=True,
            nbd_disks=self.nbd_disks,
        )

    # -- lifetime ------------------------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU paused, wait for its sockets and connect QMP (stops it on failure)."""
        if self._process is not None:
            raise BackendError(f"{self.name} is already started", target=self.name)
        for path in (self.console_socket, self.qmp_socket, *self.channel_sockets.values()):
            path.unlink(missing_ok=True)
        with open(self.qemu_log, "wb") as log:
            self._process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_for_sockets(SOCKET_TIMEOUT)
            try:
                self._monitor = QmpMonitor.connect(str(self.qmp_socket), timeout=QMP_TIMEOUT)
            except BackendError:
                self._raise_if_exited(grace=2.0)  # QEMU's own reason beats "no monitor"
                raise
        except BaseException:
            self.stop()
            raise

    def resume(self) -> None:
        """Run the guest (QMP ``cont``); attach to the console first."""
        self.monitor.execute("cont")

    def boot(self, timeout: float = 180.0) -> None:
        """Launch, run and wait for the ready marker on the console, which is then
        closed; stops QEMU if anything fails."""
        self.launch()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
                console.connect(str(self.console_socket))
                self.resume()
                self._wait_for_marker(console, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Quit QEMU (QMP quit, then SIGKILL) and close the monitor; safe to call twice."""
        if self._monitor is not None:
            with contextlib.suppress(BackendError):
                self._monitor.execute("quit")
            self._monitor.close()
            self._monitor = None
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int:
        """PID of the QEMU process (for /proc/<pid>/mem, pagemap, ksm_stat)."""
        if self._process is None:
            raise BackendError(f"{self.name} is not running", target=self.name)
        return self._process.pid

    @property
    def monitor(self) -> QmpMonitor:
        """The guest's QMP monitor (the one client its QMP socket takes)."""
        if self._monitor is None:
            raise BackendError(f"{self.name} is not running", target=self.name)
        return self._monitor

    # -- internals -----------------------------------------------------------------------

    def _raise_if_exited(self, grace: float = 0.0) -> None:
        """QEMU's exit status and log as the error, if it has exited (within *grace* s)."""
        assert self._process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(grace)
        if self._process.returncode is not None:
            raise BackendError(
                f"QEMU for {self.name} exited with {self._process.returncode}: "
                f"{self.qemu_log.read_text(errors='replace').strip()}",
                target=self.name,
            )

    def _wait_for_sockets(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.qmp_socket.exists() and self.console_socket.exists()):
            self._raise_if_exited()
            if time.monotonic() > deadline:
                raise BackendError(
                    f"QEMU for {self.name} created no sockets within {timeout:g} s",
                    target=self.name,
                )
            time.sleep(0.02)

    def _wait_for_marker(self, console: socket.socket, timeout: float) -> None:
        marker = READY_MARKER.encode()
        seen = b""
        deadline = time.monotonic() + timeout
        with open(self.console_log, "ab") as log:
            while marker not in seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendError(
                        f"{self.name} printed no {READY_MARKER} within "
                        f"{timeout:g} s (see {self.console_log})",
                        target=self.name,
                    )
                console.settimeout(min(remaining, 1.0))
                try:
                    chunk = console.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise BackendError(
                        f"the console of {self.name} closed during boot (see {self.qemu_log})",
                        target=self.name,
                    )
                log.write(chunk)
                # The marker may straddle two reads; keep just enough of the tail.
                seen = seen[-len(marker) :] + chunk


class _Vm(Protocol):
    name: str

    def stop(self) -> None: ...


V = TypeVar("V", bound=_Vm)


def boot_in_parallel(vms: Sequence[V], boot: Callable[[V], None]) -> list[V]:
    """Run ``boot(vm)`` for every guest in its own thread (TCG boots are CPU-bound, but
    their waits overlap); on any failure stop them all and re-raise the first error."""
    errors: list[BaseException] = []

    def run(vm: V) -> None:
        try:
            boot(vm)
        except BaseException as err:  # re-raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(vm,), name=f"boot:{vm.name}") for vm in vms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for vm in vms:
            vm.stop()
        raise errors[0]
    return list(vms)


def boot_many(
    image: ImagePaths,
    workdir: Path,
    names: Sequence[str],
    *,
    memory_mib: int = 256,
    append: str = "",
) -> list[LaunchedVm]:
    """Boot guests in parallel threads; on any failure stop them all and re-raise."""
    vms = [LaunchedVm(image, workdir, name=n, memory_mib=memory_mib, append=append) for n in names]
    return boot_in_parallel(vms, LaunchedVm.boot)
