"""Two libvirt hosts on this one machine, for tests that need a real libvirt live migration.

Overview.  A :class:`LibvirtHost` is what a second machine would give a test, built from
namespaces:

* a network namespace (``ip netns``) with one end of a veth pair and a private address
  (10.79.0.1/24 for ``a``, 10.79.0.2/24 for ``b``); the addresses exist only inside the two
  namespaces, so concurrent runs and the machine's own network never see each other;
* a mount namespace in which libvirt's directories are the host's own: ``/etc/libvirt``
  (a generated ``libvirtd.conf`` and ``qemu.conf``), ``/run/libvirt``, ``/var/lib/libvirt``,
  ``/var/cache/libvirt`` and ``/var/log/libvirt`` are bind mounts of per-host directories, and
  so is :attr:`LibvirtPair.private` — one path, the same in both hosts, a different directory
  in each (memd's sockets and a guest's console socket live there and must not collide when
  the destination QEMU binds the same path as the source QEMU);
* a UTS namespace with its own hostname (libvirt refuses a migration whose two ends report
  the same hostname or the same host UUID);
* its own ``libvirtd --listen`` in all three: reachable from the test process over its unix
  socket (:attr:`LibvirtHost.uri`) and from the other host over TCP (:attr:`LibvirtHost.tcp_uri`).

A holder process (``sleep``) keeps each host's namespaces alive; every process of the host
is started with ``nsenter`` into the holder's namespaces (:meth:`LibvirtHost.popen`,
:meth:`LibvirtHost.run`).  The mounts exist only inside the host's mount namespace, so they
vanish with its last process: nothing is ever mounted on the machine itself.

:func:`libvirt_pair` is the context manager tests use; its clean-up always runs: domains
destroyed, libvirtds stopped, any process still inside a host killed, namespaces deleted.
The system libvirtd (``qemu:///system`` at /run/libvirt) is never contacted or changed.

Use::

    with libvirt_pair(tmp_path_factory.mktemp("lvp")) as pair:
        conn = pair.a.connect()                 # qemu+unix:///system?socket=<a's socket>
        conn.createXML(xml, 0)                  # sockets in the XML: under pair.private
        agent = pair.b.popen(                   # a process inside host b (nsenter execs it:
            [sys.executable, "-m", "memd.cli",  # popen's pid is the process itself)
             "serve", "--libvirt", "qemu:///system", ...],   # inside b: b's own libvirtd
            env=pair.memd_env(), cwd=ROOT)      # memd's dirs under pair.private
        pair.migrate(NAME, to=pair.b)           # = virsh migrate --live --p2p on host a
        pair.a.virsh("list")                    # virsh on host a
        pair.b.outside(path_inside_b)           # a file of host b, as the test reaches it

What is *not* separate: the rest of the filesystem (the image cache, /tmp, the suite's
sandbox) is the machine's, seen alike by both hosts, exactly as a shared disk would be.

Known limits: the hosts' QEMUs run as root and without cgroups (see :func:`qemu_conf`);
the machine's image-cache pruning (hypervisor.vmimage) does not see the hosts' domains.

State: a pair belongs to the one test thread that made it; nothing here is shared.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import terminate
from tests.support.veth import End, delete_namespaces, link_namespaces

#: libvirt's directories each host gets its own copy of (inside path -> per-host subdirectory).
HOST_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
SUBNET = "10.79.0"  # the same in every pair: each pair's addresses exist only in its namespaces
#: Namespace names carry the owning test process's pid (and a per-process counter), so a
#: leftover from a run that was killed can be recognised and swept (see sweep_stale).
_NETNS_NAME = re.compile(r"lvpair-(\d+)x(\d+)-[ab]")
_PAIR_NUMBERS = itertools.count(1)
LIBVIRTD_PORT = 16509
#: The system libvirtd's QEMU capabilities cache; copied into each host (see _seed_caps_cache).
SYSTEM_CAPS_CACHE = Path("/var/cache/libvirt/qemu/capabilities")
_TOOLS = ("ip", "nsenter", "unshare", "mount", "libvirtd", "qemu-system-x86_64")


def unavailable_reason() -> str | None:
    """Why a pair cannot be built here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "a libvirt pair needs root (namespaces, mounts, libvirtd)"
    for tool in _TOOLS:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt python binding is not installed (python3-libvirt)"
    return None


def requires_libvirt_pair() -> list[pytest.MarkDecorator]:
    """A test module's ``pytestmark`` for tests on a pair: skipped where one cannot be built
    (with the reason), and marked as needing real VMs, libvirt and root."""
    reason = unavailable_reason()
    return [
        pytest.mark.skipif(reason is not None, reason=reason or ""),
        pytest.mark.vm,
        pytest.mark.libvirt,
        pytest.mark.root,
    ]


def _which(tool: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    assert found is not None, f"{tool} is not installed"
    return found


def libvirtd_conf(address: str, host_uuid: str) -> str:
    """The host's libvirtd.conf.  Test only: TCP without authentication or encryption."""
    return "\n".join(
        [
            # --listen needs a listener; TLS would need a PKI, and the migration test is about
            # libvirt's and memd's behaviour, not libvirt's transport security.
            "listen_tls = 0",
            "listen_tcp = 1",
            f'listen_addr = "{address}"',
            f'tcp_port = "{LIBVIRTD_PORT}"',
            'auth_tcp = "none"',
            'auth_unix_rw = "none"',
            # libvirt compares the two ends' host UUIDs (and hostnames) and refuses to migrate
            # "to the same host"; every machine-derived UUID is the same machine's here.
            f'host_uuid = "{host_uuid}"',
            "log_level = 3",
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
            "",
        ]
    )


def qemu_conf(address: str) -> str:
    """The host's qemu.conf; every line says why the default does not fit a namespace host."""
    return "\n".join(
        [
            # QEMU's stdout/stderr go to /var/log/libvirt/qemu/NAME.log directly: no virtlogd,
            # which would be one more daemon per host with its socket in /run/libvirt.
            'stdio_handler = "file"',
            # No AppArmor/SELinux profile generation: the profiles are the machine's, not the
            # host's, and a profile would not allow the per-host paths.
            'security_driver = "none"',
            # QEMU runs as root and libvirt relabels nothing: the guest image (kernel, initrd) is
            # the image cache the system libvirtd's domains boot from too, and a private libvirtd
            # chowning it (and "restoring" it at its own teardown) would change files under the
            # other daemon's guests.  Root also reaches every socket in the per-host directories.
            'user = "root"',
            'group = "root"',
            "dynamic_ownership = 0",
            "remember_owner = 0",
            # No cgroups: both libvirtds would name their machines alike ("qemu-1-NAME" right
            # after a migration) in the same cgroup tree, and the source's teardown would remove
            # the destination's group.  (ip netns exec remounts /sys, so none is mounted anyway.)
            "cgroup_controllers = [ ]",
            # The destination QEMU listens for the migration stream on the host's address, and
            # tells the source to connect there: by default libvirt would use the hostname, which
            # resolves nowhere inside a namespace.
            f'migration_address = "{address}"',
            f'migration_host = "{address}"',
            "",
        ]
    )


@dataclass
class LibvirtHost:
    """One simulated host: its namespaces, directories and libvirtd.

    ``root`` is the host's directory as the test process (the machine's mount namespace) sees
    it; :meth:`outside` maps a path as the host sees it to the same file from outside.
    """

    label: str  #: "a" or "b"
    address: str  #: the host's IPv4 address on the veth pair
    netns: str  #: its ``ip netns`` name
    hostname: str
    host_uuid: str
    root: Path
    private: Path  #: the pair's same-path private directory (inside path)
    holder: subprocess.Popen[bytes] | None = None
    libvirtd: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        """The test process's URI for this host's libvirtd (its unix socket, from outside)."""
        return f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    @property
    def tcp_uri(self) -> str:
        """The URI the *other* host uses for this one (e.g. a peer-to-peer migration's)."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def libvirtd_log(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    def qemu_log(self, domain: str) -> Path:
        return self.root / "log" / "qemu" / f"{domain}.log"

    def outside(self, inside: str | Path) -> Path:
        """The file a path inside this host names, as the test process reaches it."""
        path = Path(inside)
        mounts = {Path(k): self.root / v for k, v in HOST_DIRS.items()}
        mounts[self.private] = self.root / "private"
        for mount_point, backing in mounts.items():
            if path == mount_point or mount_point in path.parents:
                return backing / path.relative_to(mount_point)
        return path

    # -- running things inside the host --------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the host's network, mount and UTS namespaces."""
        assert self.holder is not None, f"host {self.label} is not up"
        return [
            _which("nsenter"),
            f"--target={self.holder.pid}",
            "--net",
            "--mount",
            "--uts",
            "--",
            *argv,
        ]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host and wait for it (text output captured)."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), check=check, timeout=timeout, text=True, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process inside the host; it is killed at the pair's teardown if still up."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        process: subprocess.Popen[bytes] = subprocess.Popen(self.argv(argv), **kwargs)
        self.started.append(process)
        return process

    def virsh(self, *args: str, check: bool = True) -> str:
        """``virsh ARGS`` on this host (against its own libvirtd); its stdout."""
        return self.run(["virsh", "-c", "qemu:///system", *args], check=check).stdout

    def connect(self) -> Any:
        """A libvirt connection to this host's libvirtd (``libvirt.virConnect``)."""
        import libvirt

        return libvirt.open(self.uri)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.libvirtd_log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no libvirtd log)"

    # -- life cycle (driven by LibvirtPair) ----------------------------------------------------

    def prepare(self) -> None:
        """The host's directories and configuration files, written from outside."""
        for sub in (*HOST_DIRS.values(), "private"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        (etc / "libvirtd.conf").write_text(libvirtd_conf(self.address, self.host_uuid))
        (etc / "qemu.conf").write_text(qemu_conf(self.address))
        # Both hosts' libvirtds and the test process reach the private directory's sockets as
        # root; 0755 keeps a world-writable directory out of the picture.
        (self.root / "private").chmod(0o755)
        _seed_caps_cache(self.root / "cache" / "qemu" / "capabilities")

    def start_holder(self, timeout: float = 15.0) -> None:
        """Create the mount and UTS namespaces inside the network namespace, mount the host's
        directories there and keep them alive with a ``sleep``."""
        mounts = [
            f"mount --bind {shlex.quote(str(self.root / sub))} {shlex.quote(inside)}"
            for inside, sub in HOST_DIRS.items()
        ]
        mounts.append(
            f"mount --bind {shlex.quote(str(self.root / 'private'))} "
            f"{shlex.quote(str(self.private))}"
        )
        ready = self.root / "holder.ready"
        script = "\n".join(
            [
                "set -e",
                f"hostname {shlex.quote(self.hostname)}",
                *mounts,
                f"touch {shlex.quote(str(ready))}",
                # exec: the holder's pid is the one nsenter --target uses.
                "exec sleep infinity",
            ]
        )
        # ip netns exec (rather than nsenter --net) because it also remounts /sys for the
        # namespace: /sys/class/net shows the host's own interfaces and the machine's cgroup
        # hierarchy is not mounted, so libvirtd cannot touch the test's cgroups.  unshare's
        # default propagation is private: no mount made here reaches the machine.
        self.holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--mount",
                "--uts",
                "--",
                "sh",
                "-c",
                script,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "holder.err", "wb"),  # noqa: SIM115 (the child owns it)
        )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                err = (self.root / "holder.err").read_text(errors="replace")
                raise AssertionError(f"host {self.label}'s namespaces did not come up: {err}")
            time.sleep(0.02)

    def start_libvirtd(self) -> None:
        """``libvirtd --listen`` in the foreground inside the host (no systemd socket
        activation: the daemon opens its own unix and TCP sockets from libvirtd.conf).
        :meth:`wait_libvirtd` waits until it answers: the pair starts both, then waits."""
        with open(self.root / "libvirtd.out", "ab") as out:
            self.libvirtd = self.popen(
                [
                    _which("libvirtd"),
                    "--listen",
                    "--config",
                    "/etc/libvirt/libvirtd.conf",
                    # The default pid file is /run/libvirtd.pid, outside /run/libvirt: the
                    # system libvirtd's, whose lock would stop this daemon from starting.
                    "--pid-file",
                    "/run/libvirt/libvirtd.pid",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_libvirtd(self, timeout: float = 60.0) -> None:
        import libvirt

        assert self.libvirtd is not None, f"libvirtd of host {self.label} was not started"
        sock = self.root / "run" / "libvirt-sock"
        deadline = time.monotonic() + timeout
        while True:
            if self.libvirtd.poll() is not None:
                raise AssertionError(
                    f"libvirtd of host {self.label} exited {self.libvirtd.returncode}:\n"
                    f"{(self.root / 'libvirtd.out').read_text(errors='replace')}\n"
                    f"{self.log_tail()}"
                )
            if sock.exists():
                with contextlib.suppress(libvirt.libvirtError):
                    # Not getCapabilities(): that probes every qemu-system-* binary (i386 too,
                    # which the system cache usually lacks: seconds); starting a domain probes
                    # only its own emulator, found in the seeded cache.
                    conn = libvirt.open(self.uri)
                    conn.getHostname()
                    conn.close()
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"libvirtd of host {self.label} did not answer:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Destroy every domain, stop libvirtd, kill whatever else still runs in the host and
        let the namespaces go.  Each step runs whatever the previous one did."""
        try:
            self._destroy_domains()
        finally:
            try:
                terminate(self.libvirtd, 20.0)
                self.libvirtd = None
                for process in self.started:
                    terminate(process, 10.0)
                self._kill_stragglers()
            finally:
                terminate(self.holder, 5.0)
                self.holder = None

    def _destroy_domains(self) -> None:
        if self.libvirtd is None or self.libvirtd.poll() is not None:
            return
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(self.uri)
            try:
                for domain in conn.listAllDomains():
                    with contextlib.suppress(libvirt.libvirtError):
                        if domain.isActive():
                            domain.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        if domain.isPersistent():
                            domain.undefine()
            finally:
                conn.close()

    def _kill_stragglers(self) -> None:
        """Kill processes still in the host's network namespace (a QEMU whose libvirtd
        died): only this host's processes live there.  The network namespace, not the mount
        namespace: libvirt gives each QEMU a mount namespace of its own (a private /dev)."""
        _kill_netns_members(self.netns)


def _kill_netns_members(netns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    for pid in pids.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _seed_caps_cache(target: Path) -> None:
    """Copy the system libvirtd's QEMU capability cache into a host's cache.

    Probing qemu-system-x86_64 costs libvirtd seconds of QEMU start-up per daemon (more on a
    busy 2-core machine); the system's cache describes the same binaries.  libvirtd checks
    each entry (binary and daemon ctimes, kernel, microcode) and probes again if it is stale,
    so a copy can only save time, never give wrong answers.
    """
    target.mkdir(parents=True, exist_ok=True)
    if not SYSTEM_CAPS_CACHE.is_dir():
        return
    for entry in SYSTEM_CAPS_CACHE.glob("*.xml"):
        with contextlib.suppress(OSError):
            shutil.copy2(entry, target / entry.name)


@dataclass
class LibvirtPair:
    """Two hosts joined by a veth pair; see the module's overview."""

    a: LibvirtHost
    b: LibvirtHost
    private: Path  #: the same-path private directory (inside path; a different dir per host)

    @property
    def hosts(self) -> tuple[LibvirtHost, LibvirtHost]:
        return self.a, self.b

    def peer(self, host: LibvirtHost) -> LibvirtHost:
        return self.b if host is self.a else self.a

    def memd_env(self) -> dict[str, str]:
        """Environment for a ``memd`` process inside either host: its run, state and NBD
        directories in the private directory, so the two hosts' agents use the same paths
        (as on two real machines) without sharing a file.  (The suite's conftest points
        these variables at one sandbox, which both hosts would otherwise share.)"""
        return {
            **os.environ,
            "MEMD_RUN_DIR": str(self.private / "memd-run"),
            "MEMD_STATE_DIR": str(self.private / "memd-state"),
            "MEMD_NBD_DIR": str(self.private / "memd-nbd"),
        }

    def migrate(
        self,
        domain: str,
        *,
        to: LibvirtHost,
        flags: int | None = None,
        params: dict[str, Any] | None = None,
    ) -> float:
        """Migrate ``domain`` from the other host to ``to`` the way an operator's
        ``virsh migrate --live --p2p DOMAIN qemu+tcp://ADDR/system`` does: the source libvirtd
        connects to the destination's over TCP, the migration stream runs between the two
        hosts' addresses.  Returns the seconds ``migrateToURI3`` took; raises libvirtError
        when libvirt reports a failure."""
        import libvirt

        if flags is None:
            flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
        conn = self.peer(to).connect()
        try:
            start = time.monotonic()
            conn.lookupByName(domain).migrateToURI3(to.tcp_uri, params or {}, flags)
            return time.monotonic() - start
        finally:
            conn.close()


def sweep_stale() -> list[str]:
    """Delete the namespaces (and kill the processes in them: libvirtd, QEMU, the holder)
    that a pair of a test process no longer alive left behind, e.g. after a SIGKILL; the
    names it deleted.  A pair of a live process is never touched."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    swept = []
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _NETNS_NAME.fullmatch(name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        _kill_netns_members(name)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        swept.append(name)
    return swept


def _make_host(label: str, index: int, tag: str, base: Path, private: Path) -> LibvirtHost:
    return LibvirtHost(
        label=label,
        address=f"{SUBNET}.{index}",
        netns=f"lvpair-{tag}-{label}",
        # A dot: libvirt takes a hostname with a dot as fully qualified and does not try to
        # resolve it (there is no DNS inside the namespace; a lookup would only time out).
        hostname=f"lvpair-{label}.test",
        host_uuid=str(uuid.uuid4()),
        root=base / label,
        private=private,
    )


def _create_network(a: LibvirtHost, b: LibvirtHost, tag: str, made: list[str]) -> None:
    link_namespaces(
        End(a.netns, f"lvp{tag}a", a.address), End(b.netns, f"lvp{tag}b", b.address), made
    )


@contextlib.contextmanager
def libvirt_pair(
    base: Path, *, before_libvirtd: Callable[[LibvirtHost], None] | None = None
) -> Iterator[LibvirtPair]:
    """Two running libvirt hosts under ``base`` (a fresh directory; keep it short: unix socket
    paths under it are limited to 107 bytes).  Everything is torn down on exit.

    ``before_libvirtd(host)`` runs for each host once its directories exist and before its
    libvirtd starts: e.g. to install hooks in ``host.outside("/etc/libvirt/hooks")``, which
    libvirtd looks for only when it starts (or reloads on SIGHUP)."""
    sweep_stale()
    tag = f"{os.getpid()}x{next(_PAIR_NUMBERS)}"
    private = base / "run"  # the same path in both hosts, an empty directory from outside
    private.mkdir(parents=True, exist_ok=True)
    a = _make_host("a", 1, tag, base, private)
    b = _make_host("b", 2, tag, base, private)
    made: list[str] = []
    try:
        _create_network(a, b, tag, made)
        for host in (a, b):
            host.prepare()
            host.start_holder()
        for host in (a, b):
            if before_libvirtd is not None:
                before_libvirtd(host)
            host.start_libvirtd()
        for host in (a, b):
            host.wait_libvirtd()
        yield LibvirtPair(a, b, private)
    finally:
        try:
            for host in (a, b):
                with contextlib.suppress(Exception):
                    host.stop()
        finally:
            delete_namespaces(made)
