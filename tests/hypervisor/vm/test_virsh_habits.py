"""The image's libvirt domain follows virsh habits, on a real libvirtd and a real TCG guest:
``virsh console NAME`` is the guest's shell, ``virsh shutdown NAME`` powers it off cleanly (ACPI
power button → busybox acpid → poweroff) and ``virsh start NAME`` then starts it again, as
docs/operators.md tells operators to do.

The guest is one persistent domain defined from :func:`hypervisor.vmimage.render_domain_xml` and
driven with the ``virsh`` command itself; ``virsh console`` runs on a pseudo-terminal of its own,
as in an operator's terminal. The harness's shell on the second serial port (ttyS1) is used only
to know when the guest is up and to check what the console and the shutdown did.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypervisor.vmimage import ImagePaths, render_domain_xml

from .console import GuestShell

pytestmark = [pytest.mark.vm, pytest.mark.libvirt, pytest.mark.root]

URI = "qemu:///system"
PROMPT = re.compile(rb"memd-guest# ")
_names = itertools.count()


def virsh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``virsh -c URI ARGS`` and return what it did (never raises on a non-zero exit)."""
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def domstate(name: str) -> str:
    """``virsh domstate --reason NAME``, e.g. ``shut off (shutdown)`` or ``running (booted)``."""
    return virsh("domstate", "--reason", name).stdout.strip()


class VirshConsole:
    """``virsh console NAME`` on its own pseudo-terminal (virsh refuses to run without a tty)."""

    def __init__(self, name: str, log_path: Path) -> None:
        master, slave = os.openpty()
        try:
            self.process = subprocess.Popen(
                ["virsh", "-c", URI, "console", name],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self._fd = master
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        self.output = bytearray()
        self._eof = False

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self._fd, 65536)
        except OSError:  # EIO: virsh exited and closed the terminal
            data = b""
        if not data:
            self._eof = True
            return
        self.output += data
        self._log.write(data)
        self._log.flush()

    def expect(
        self, pattern: re.Pattern[bytes], start: int = 0, timeout: float = 30.0
    ) -> re.Match[bytes]:
        """First match of ``pattern`` in the output from ``start`` on, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output, start)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._eof:
                why = "virsh console ended" if self._eof else f"timed out after {timeout:.0f} s"
                raise AssertionError(
                    f"{why} waiting for {pattern.pattern!r}; output:\n"
                    f"{self.output[-800:].decode(errors='replace')}"
                )
            self._read(min(remaining, 0.5))

    def send(self, data: bytes) -> None:
        os.write(self._fd, data)

    def prompt(self, timeout: float = 60.0) -> None:
        """Press Enter until the guest's shell prompt answers (its first one went unseen)."""
        deadline = time.monotonic() + timeout
        while True:
            start = len(self.output)
            self.send(b"\r")
            try:
                self.expect(PROMPT, start, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return
            except AssertionError:
                if self._eof or time.monotonic() > deadline:
                    raise

    def type_line(
        self, line: str, answer: re.Pattern[bytes], timeout: float = 30.0
    ) -> re.Match[bytes]:
        """Type ``line`` and Enter at the prompt; wait for ``answer`` in what follows."""
        start = len(self.output)
        self.send(line.encode() + b"\r")
        return self.expect(answer, start, timeout)

    def wait_exit(self, timeout: float) -> int:
        """Wait for virsh to end by itself (the domain stopped), reading what it prints."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        return self.process.wait(timeout=1)

    def close(self) -> None:
        """Leave with the escape character (Ctrl-]); kill virsh if it does not go."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.send(b"\x1d")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._fd)
        self._log.close()


@dataclass
class Domain:
    name: str
    workdir: Path
    console_socket: Path

    def console(self) -> VirshConsole:
        return VirshConsole(self.name, self.workdir / "virsh-console.log")

    def harness_shell(self) -> GuestShell:
        return GuestShell(self.console_socket, self.workdir / "harness.log")


@pytest.fixture(scope="module")
def domain(vm_image: ImagePaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    """A defined (persistent) domain from the template, started and booted; at the end destroyed
    and undefined whatever the tests did. One for the module (a boot and a destroy cost seconds):
    the console test leaves it running, the shutdown test stops and restarts it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run libvirtd")
    from hypervisor.libvirtd import ensure_libvirtd
    from memd.errors import MemdError

    try:
        ensure_libvirtd()
    except MemdError as err:
        pytest.skip(f"no libvirtd: {err}")
    workdir = tmp_path_factory.mktemp("vh")
    workdir.chmod(0o777)  # QEMU runs as libvirt-qemu and must create the harness socket
    name = f"memd-virsh-{os.getpid()}-{next(_names)}"
    dom = Domain(name, workdir, workdir / "ttyS1.sock")
    (workdir / "domain.xml").write_text(
        render_domain_xml(vm_image, name=name, console_socket=dom.console_socket)
    )
    # --validate: libvirt checks the rendered XML against its own schema first. The timeout is
    # long because libvirtd re-probes QEMU (about a minute here) whenever its capability cache
    # is stale, e.g. after /dev/kvm changed.
    try:
        defined = virsh("define", "--validate", str(workdir / "domain.xml"), timeout=300)
        assert defined.returncode == 0, defined.stderr
        # Paused start: the harness is on ttyS1 before the guest prints its ready marker.
        started = virsh("start", "--paused", name, timeout=300)
        assert started.returncode == 0, started.stderr
        shell = dom.harness_shell()
        try:
            assert virsh("resume", name).returncode == 0
            shell.wait_ready(timeout=120)
            # acpid writes its pid file once it has opened the input devices: from then on a
            # power-button press is not lost. (An image without acpid fails the shutdown test
            # itself, not here.)
            shell.check(
                "i=0; until [ -s /run/acpid.pid ] || [ $i -ge 50 ]; do i=$((i+1)); sleep 0.1; done"
            )
        finally:
            shell.close()
        yield dom
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            virsh("destroy", name)
        if virsh("domstate", name).returncode == 0:  # defined, even if define timed out
            undefined = virsh("undefine", name, timeout=300)
            assert undefined.returncode == 0, undefined.stderr


def test_virsh_console_is_the_guests_shell(domain: Domain) -> None:
    console = domain.console()
    try:
        console.expect(re.compile(rb"Connected to domain"))
        console.prompt()
        # $((6*7)) is what the line says, 42 only what the guest's shell answers.
        answer = console.type_line(
            "echo VIRSH-$((6*7)) $(tty)", re.compile(rb"VIRSH-42 (\S+)\r?\n")
        )
        assert answer.group(1) == b"/dev/ttyS0"
        console.type_line(
            "echo typed-on-the-console > /tmp/from-virsh; echo DONE-$((1+1))",
            re.compile(rb"DONE-2"),
        )
    finally:
        console.close()
    assert console.process.returncode == 0
    # The harness's shell (ttyS1) is another shell in the same guest: it sees what was typed.
    shell = domain.harness_shell()
    try:
        shell.attach(timeout=30)
        assert shell.check("cat /tmp/from-virsh") == "typed-on-the-console\n"
    finally:
        shell.close()


def _boot_id(domain: Domain) -> str:
    """The guest kernel's boot id, read through the harness's shell (new on every boot)."""
    shell = domain.harness_shell()
    try:
        shell.attach(timeout=120)  # the shell may be up already, or still booting: prod it
        return shell.check("cat /proc/sys/kernel/random/boot_id").strip()
    finally:
        shell.close()


def test_virsh_shutdown_powers_off_cleanly_and_start_boots_again(domain: Domain) -> None:
    first_boot = _boot_id(domain)
    shutdown_at = time.monotonic()
    done = virsh("shutdown", domain.name)
    assert done.returncode == 0, done.stderr
    # "shut off (shutdown)": the guest powered itself off (libvirt says "destroyed" when it
    # had to pull the plug, and the domain stays "running" when the button is ignored).
    deadline = time.monotonic() + 60
    while (state := domstate(domain.name)) != "shut off (shutdown)":
        assert time.monotonic() < deadline, f"60 s after virsh shutdown the domain is {state!r}"
        time.sleep(0.2)
    print(f"virsh shutdown → shut off in {time.monotonic() - shutdown_at:.1f} s")

    started = virsh("start", domain.name, timeout=300)
    assert started.returncode == 0, started.stderr
    assert domstate(domain.name) == "running (booted)"
    second_boot = _boot_id(domain)
    assert second_boot != first_boot and len(second_boot) == 36
