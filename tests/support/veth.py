"""Two network namespaces joined by a veth pair: the network of the tests' simulated hosts
(tests.migrate.netns's plain namespaces, tests.support.libvirt_pair's libvirt hosts).

Every namespace made is appended to the caller's list as soon as it exists, so the caller's
clean-up (:func:`delete_namespaces`) removes it even when a later step fails.  Needs root and
``ip``.  Nothing here holds state of its own.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class End:
    """One end of the link: its namespace, its interface's name and its IPv4 address."""

    netns: str
    veth: str
    address: str


def link_namespaces(a: End, b: End, made: list[str]) -> None:
    """Create both namespaces (loopback up) and the veth pair between them, addressed /24."""
    for end in (a, b):
        assert len(end.veth) <= 15, f"interface name {end.veth} is too long for the kernel"
        ip("netns", "add", end.netns)
        made.append(end.netns)
        ip("-n", end.netns, "link", "set", "lo", "up")
    peer = ("peer", "name", b.veth, "netns", b.netns)
    ip("link", "add", a.veth, "netns", a.netns, "type", "veth", *peer)
    for end in (a, b):
        ip("-n", end.netns, "addr", "add", f"{end.address}/24", "dev", end.veth)
        ip("-n", end.netns, "link", "set", end.veth, "up")


def delete_namespaces(made: list[str]) -> None:
    """Delete the namespaces (each one's end of the veth pair goes with it); empties ``made``."""
    for ns in made:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    made.clear()
