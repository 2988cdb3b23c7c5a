"""Byte streams from the guest to the host agent: the virtio-serial port and a unix socket.

A :class:`Transport` moves bytes and nothing else; framing lives in :mod:`memd.wire`
and retry policy in :mod:`memd.guest.client`.  Contract (the client relies on it):

* ``send(data)`` writes all of ``data`` or raises ``OSError`` (``TimeoutError`` if the
  peer did not accept it within the transport's send timeout); ``send_parts(parts)``
  does the same for the concatenation of ``parts`` — a vectored write (``writev``), so
  the pages of a PUT go from the caller's buffers to the kernel without a join;
* ``recv(max_bytes, timeout)`` returns 1..max_bytes bytes, ``b""`` at end of stream,
  or raises ``TimeoutError`` when nothing arrived within ``timeout`` seconds;
* ``close()`` is idempotent.

virtio-serial facts that shaped this: the guest end is ``/dev/vportNpM``, named by
``/sys/class/virtio-ports/vportNpM/name`` (no udev symlinks in a minimal guest);
``read`` returns 0 (EOF) while the host end is not connected, and a write blocks
(EAGAIN with O_NONBLOCK) until it is.  Standard library only.
"""

from __future__ import annotations

import abc
import os
import select
import socket
from collections.abc import Sequence

from memd.errors import ChannelMissing, Unavailable
from memd.wire import PORT_NAME, Buffer

SYSFS_PORTS = "/sys/class/virtio-ports"
DEFAULT_SEND_TIMEOUT = 10.0
#: Buffers one writev() takes (Linux: 1024); a longer list is written in several calls.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class Transport(abc.ABC):
    """A bidirectional byte stream to the host agent (see the module docstring)."""

    #: Where the stream goes, for messages ("/dev/vport2p1", "unix:/run/x.sock").
    name: str = "?"

    @abc.abstractmethod
    def send(self, data: Buffer) -> None: ...

    def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Write the concatenation of ``parts`` (this default joins them; stream
        transports override it with a vectored write)."""
        self.send(b"".join(parts))

    @abc.abstractmethod
    def recv(self, max_bytes: int, timeout: float | None) -> bytes: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SelectTransport(Transport):
    """A non-blocking file descriptor waited on with select()."""

    def __init__(self, fd: int, name: str, send_timeout: float) -> None:
        self._fd = fd
        self.name = name
        self.send_timeout = send_timeout
        self._closed = False

    @abc.abstractmethod
    def _read(self, max_bytes: int) -> bytes: ...

    @abc.abstractmethod
    def _write(self, data: memoryview) -> int: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def _wait(self, for_write: bool, timeout: float | None) -> None:
        if self._closed:
            raise OSError(f"{self.name} is closed")
        fds = [self._fd]
        r, w, _ = select.select([] if for_write else fds, fds if for_write else [], [], timeout)
        if not (r or w):
            raise TimeoutError(
                f"{self.name}: nothing {'accepted' if for_write else 'arrived'} within {timeout} s"
            )

    def send(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                sent = self._write(view)
            except BlockingIOError:
                sent = 0
            if sent:
                view = view[sent:]
            else:
                self._wait(True, self.send_timeout)

    def send_parts(self, parts: Sequence[Buffer]) -> None:
        views = [v for v in (memoryview(p).cast("B") for p in parts) if v]
        first = 0  # views[first:] are still to be written; views[first] maybe in part
        while first < len(views):
            try:
                sent = os.writev(self._fd, views[first : first + _IOV_MAX])
            except BlockingIOError:
                sent = 0
            if not sent:
                self._wait(True, self.send_timeout)
                continue
            while sent:
                head = views[first]
                if sent < len(head):
                    views[first] = head[sent:]
                    break
                sent -= len(head)
                first += 1

    def recv(self, max_bytes: int, timeout: float | None) -> bytes:
        while True:
            try:
                return self._read(max_bytes)
            except BlockingIOError:
                self._wait(False, timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()


class CharDeviceTransport(_SelectTransport):
    """The guest end of a virtio-serial port (``/dev/vportNpM``)."""

    def __init__(self, path: str, *, send_timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            raise ChannelMissing(f"{path} does not exist", target=path) from None
        except OSError as err:
            raise Unavailable(f"cannot open {path}: {err.strerror}", target=path) from None
        super().__init__(fd, path, send_timeout)

    def _read(self, max_bytes: int) -> bytes:
        return os.read(self._fd, max_bytes)

    def _write(self, data: memoryview) -> int:
        return os.write(self._fd, data)

    def _close(self) -> None:
        os.close(self._fd)


class SocketTransport(_SelectTransport):
    """A connected stream socket (a unix socket in development and tests)."""

    def __init__(
        self,
        sock: socket.socket,
        name: str | None = None,
        *,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        super().__init__(sock.fileno(), name or f"socket:{sock.fileno()}", send_timeout)

    @classmethod
    def connect_unix(
        cls, path: str, *, send_timeout: float = DEFAULT_SEND_TIMEOUT
    ) -> SocketTransport:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            raise Unavailable(
                f"cannot connect to unix:{path}: {err.strerror or err}", target=path
            ) from None
        return cls(sock, f"unix:{path}", send_timeout=send_timeout)

    def _read(self, max_bytes: int) -> bytes:
        return self._sock.recv(max_bytes)

    def _write(self, data: memoryview) -> int:
        return self._sock.send(data)

    def _close(self) -> None:
        self._sock.close()


def list_ports(sysfs: str = SYSFS_PORTS, dev: str = "/dev") -> dict[str, str]:
    """virtio-serial port name -> device path, from sysfs (empty if there are none)."""
    ports: dict[str, str] = {}
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        return ports
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "name"), encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            ports.setdefault(name, os.path.join(dev, entry))
    return ports


def find_port(name: str = PORT_NAME, sysfs: str = SYSFS_PORTS, dev: str = "/dev") -> str:
    """Device path of the virtio-serial port called ``name``."""
    ports = list_ports(sysfs, dev)
    if name not in ports:
        known = ", ".join(sorted(ports)) or "none"
        raise ChannelMissing(
            f"no virtio-serial port named {name} (ports found: {known}); "
            "is the VM configured with the memd channel and virtio_console "
            "loaded?",
            target=name,
        )
    return ports[name]
