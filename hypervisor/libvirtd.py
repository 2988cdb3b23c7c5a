"""Start libvirt's daemons on a host (or container) without systemd: tests and demos.

On a normal host systemd starts libvirtd (see docs/operators.md).  Test machines and
containers often have no init system, so :func:`ensure_libvirtd` does what an operator
would by hand, as root: ``virtlogd -d`` (libvirtd's QEMU driver refuses to start guests
without it) and then ``libvirtd -d``, and waits until the socket accepts connections.
Daemons it starts keep running after the process exits — other tests share them — and
a daemon already running is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from memd import paths
from memd.errors import PermissionDenied, Unavailable

LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"


def libvirtd_running() -> bool:
    return paths.socket_accepts(LIBVIRTD_SOCKET)


def _start_daemon(binary: str, sock: str, timeout: float) -> bool:
    """Start ``binary -d`` unless ``sock`` already answers; True if this call started it."""
    if paths.socket_accepts(sock):
        return False
    exe = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if exe is None:
        raise Unavailable(f"{binary} is not installed (apt-get install libvirt-daemon-system)")
    # -d daemonises: the command returns once the daemon has forked.  A second instance
    # started concurrently exits on the pid-file lock; polling the socket covers both.
    result = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if paths.socket_accepts(sock):
            return True
        time.sleep(0.05)
    raise Unavailable(
        f"{binary} did not start within {timeout:g} s: "
        f"{(result.stderr or result.stdout).strip() or 'no output'}"
    )


def ensure_libvirtd(timeout: float = 15.0) -> bool:
    """Make sure virtlogd and libvirtd run; True if this call started libvirtd.

    Raises PermissionDenied when a daemon must be started and we are not root, and
    Unavailable when the binaries are missing or a daemon does not come up in time.
    """
    if libvirtd_running() and paths.socket_accepts(VIRTLOGD_SOCKET):
        return False
    if os.geteuid() != 0:
        raise PermissionDenied("libvirtd is not running and only root can start it")
    _start_daemon("virtlogd", VIRTLOGD_SOCKET, timeout)
    return _start_daemon("libvirtd", LIBVIRTD_SOCKET, timeout)
