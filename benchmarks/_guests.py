"""Real memd-image guests for the benchmarks, built from product modules only.

A :class:`BenchGuest` is one plain QEMU (TCG, no libvirt) started from
:func:`hypervisor.vmimage.qemu_argv`, with a :class:`hypervisor.qmp.QmpMonitor` on its QMP
socket — the monitor :class:`~hypervisor.qemu_machine.QemuMachine` attaches through, the
only client of that socket.  It is "booted" once the guest prints
:data:`hypervisor.vmimage.READY_MARKER` on the serial console; after that the console is
closed (nothing in a benchmark types into the guest).  :func:`boot_many` boots several at
once: TCG boots are CPU-bound, but their waits overlap.

The tests have a richer guest (tests/vm/harness.py: shell, reboots, port helpers); a
benchmark must run from a checkout without the test tree on ``sys.path``, hence this module.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

from hypervisor.qmp import QmpMonitor
from hypervisor.vmimage import READY_MARKER, ImagePaths, qemu_argv
from memd.errors import BackendError


class BenchGuest:
    """One TCG guest booted from ``image``, its sockets and logs in ``workdir``."""

    def __init__(
        self,
        image: ImagePaths,
        workdir: Path,
        *,
        name: str,
        memory_mib: int = 256,
        append: str = "",
    ) -> None:
        self.image = image
        self.name = name
        self.memory_mib = memory_mib
        #: Extra kernel command line (e.g. ``memmap=52M$128M``: RAM the guest keeps off).
        self.append = append
        workdir.mkdir(parents=True, exist_ok=True)
        self.console_socket = workdir / f"{name}.console.sock"
        self.qmp_socket = workdir / f"{name}.qmp.sock"
        self.console_log = workdir / f"{name}.console.log"
        self.qemu_log = workdir / f"{name}.qemu.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._monitor: QmpMonitor | None = None

    def start(self, timeout: float = 180.0) -> None:
        """Launch QEMU paused, attach console and QMP, run it, wait for the ready marker."""
        if self._process is not None:
            raise BackendError(f"{self.name} is already started", target=self.name)
        for path in (self.console_socket, self.qmp_socket):
            path.unlink(missing_ok=True)
        argv = qemu_argv(
            self.image,
            name=self.name,
            memory_mib=self.memory_mib,
            append=self.append,
            console_socket=self.console_socket,
            qmp_socket=self.qmp_socket,
            start_paused=True,
        )
        with open(self.qemu_log, "wb") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_for_sockets(timeout=20.0)
            # Connect the console before "cont" (QEMU starts with -S): a chardev without a
            # client drops output, and the ready marker must not be lost.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
                console.connect(str(self.console_socket))
                self._monitor = QmpMonitor.connect(str(self.qmp_socket))
                self._monitor.execute("cont")
                self._wait_for_marker(console, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_sockets(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while not (self.qmp_socket.exists() and self.console_socket.exists()):
            if self._process.poll() is not None:
                raise BackendError(
                    f"QEMU for {self.name} exited with "
                    f"{self._process.returncode}: "
                    f"{self.qemu_log.read_text(errors='replace').strip()}",
                    target=self.name,
                )
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


def boot_many(
    image: ImagePaths,
    workdir: Path,
    names: list[str],
    *,
    memory_mib: int = 256,
    append: str = "",
) -> list[BenchGuest]:
    """Boot guests in parallel threads; on any failure stop them all and re-raise."""
    guests = [
        BenchGuest(image, workdir, name=n, memory_mib=memory_mib, append=append) for n in names
    ]
    errors: list[BaseException] = []

    def start(guest: BenchGuest) -> None:
        try:
            guest.start()
        except BaseException as err:  # re-raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=start, args=(g,)) for g in guests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for g in guests:
            g.stop()
        raise errors[0]
    return guests
