"""memd guest agent: runs inside a guest with only python3-minimal.

:class:`GuestClient` (``memd.guest.client``) speaks :mod:`memd.wire` to the host agent
over the virtio-serial port ``org.memd.0``; ``memd.guest.transport`` finds and opens
that port; ``memd.guest.cli`` is the ``memd-guest`` command.  Imports only the standard
library, ``memd.errors``, ``memd.vocab`` and ``memd.wire`` (the guest image carries
exactly these: vm-images/agent-files.txt).
"""

from memd.guest.client import GuestClient, read_boot_id
from memd.guest.transport import (
    CharDeviceTransport,
    SocketTransport,
    Transport,
    find_port,
    list_ports,
)

__all__ = [
    "CharDeviceTransport",
    "GuestClient",
    "SocketTransport",
    "Transport",
    "find_port",
    "list_ports",
    "read_boot_id",
]
