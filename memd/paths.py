"""Where memd keeps things on the host: the one place that names production paths.

Three directories, each overridable by the environment so that tests, benchmarks and a
second agent never touch a running agent's files:

    run dir    $MEMD_RUN_DIR,   default /run/memd      tmpfs: dies with the host
               control socket, the KSM knobs found at start (restored after any stop),
               the tmem store (``store/``, unless ``memd serve --store DIR``),
               swap-disk markers (swap/)
    state dir  $MEMD_STATE_DIR, default /var/lib/memd  disk: survives a host reboot
               swap-disk spill files (spill/)
    nbd dir    $MEMD_NBD_DIR,   default /run/memd-nbd  tmpfs, mode 0711
               the NBD sockets of swap disks memd hot-plugs into libvirt domains: the
               domains' QEMU (user libvirt-qemu) must reach them, and the run dir is
               root-only (mode 0750 under systemd)

``$MEMD_SOCKET`` still overrides the control socket alone.  Nothing here creates a
directory: the component that writes a file makes its parent (mode 0700/0750).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PRODUCTION_RUN_DIR = Path("/run/memd")
PRODUCTION_STATE_DIR = Path("/var/lib/memd")
PRODUCTION_NBD_DIR = Path("/run/memd-nbd")


def run_dir() -> Path:
    return Path(os.environ.get("MEMD_RUN_DIR") or PRODUCTION_RUN_DIR)


def state_dir() -> Path:
    return Path(os.environ.get("MEMD_STATE_DIR") or PRODUCTION_STATE_DIR)


def nbd_dir() -> Path:
    return Path(os.environ.get("MEMD_NBD_DIR") or PRODUCTION_NBD_DIR)


def control_socket() -> Path:
    """The operator control socket (``$MEMD_SOCKET``, else ``<run dir>/memd.sock``)."""
    return Path(os.environ.get("MEMD_SOCKET") or run_dir() / "memd.sock")


def ksm_originals() -> Path:
    """The KSM knobs as the host had them before any memd agent changed them."""
    return run_dir() / "ksm-originals.json"


def tmem_store() -> Path:
    """The default tmem store directory (LMDB), on tmpfs: it survives any crash of the
    agent and dies with the host, like the guests whose pages it holds."""
    return run_dir() / "store"


#: The kernel's random id of this host boot.
HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_boot_id() -> str:
    """This boot of the host (the kernel's random boot id): state written under another
    boot id describes guests and knobs that no longer exist."""
    try:
        return HOST_BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def socket_accepts(path: str | Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the unix socket ``path``: a live agent or
    daemon is there, where a socket file alone may be left over from a crash."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True
