"""`memd serve`: run the host agent until SIGINT/SIGTERM.

Guests come from ``--channel NAME=PATH`` (QEMU listens on PATH), ``--listen NAME=PATH``
(the agent listens), ``memd attach`` at run time, and — with ``--libvirt URI`` — every
running libvirt domain that has a memd channel, followed through lifecycle events.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from memd.agent.app import AgentApp

log = logging.getLogger("memd.agent")


def serve(args: argparse.Namespace, *, control_path: str) -> int:
    from memd.cli import configure_logging

    configure_logging(args.log_level, args.log_json)
    return asyncio.run(_serve(args, control_path))


async def _serve(args: argparse.Namespace, control_path: str) -> int:
    app = AgentApp(budget_bytes=args.budget, guest_cap_bytes=args.guest_cap)
    if args.state:
        app.load_state(args.state)
    await app.start(control_path)
    for name, path in args.channel:
        await app.agent.add_channel(name, path, mode="connect")
    for name, path in args.listen:
        await app.agent.add_channel(name, path, mode="listen")
    for name, qmp_path in args.qmp:
        await asyncio.to_thread(_attach_plain_qemu, app, name, qmp_path)
    follower = None
    if args.libvirt:
        from memd.libvirt_cli import LibvirtFollower

        follower = LibvirtFollower(app, args.libvirt)
        await follower.start()
    log.info("memd agent running (control %s)", control_path)
    try:
        await app.run_until_signalled()
    finally:
        if follower is not None:
            follower.close()
        if args.state:
            app.save_state(args.state)
    return 0


def _attach_plain_qemu(app: AgentApp, name: str, qmp_path: str) -> None:
    """A QEMU started without libvirt: its QMP socket, and the pid that serves it."""
    from hypervisor.procmem import qemu_pid_for_socket
    from hypervisor.qmp import QmpMonitor

    monitor = QmpMonitor.connect(qmp_path)
    app.attach_qemu(name, qemu_pid_for_socket(qmp_path), monitor)
