"""memd: host-side memory service for QEMU/KVM guests.

Layering (an import may only point downwards):

    memd.cli, memd.demo                 operator entry points
    memd.agent                          asyncio host agent, control socket
    hypervisor                          all host I/O: machines, channels, libvirt, QMP, /proc
    tmem, sharing, memd.wire            pure logic, no I/O
    memd.errors                         the exception tree

``memd.guest`` is the guest agent: standard library only, it imports just
``memd.errors`` and ``memd.wire`` so that it runs inside a python3-minimal guest.
"""

__version__ = "0.1.0"
