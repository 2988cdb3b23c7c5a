"""`memd serve`: run the host agent until SIGINT/SIGTERM.

Guests come from ``--channel NAME=PATH`` (QEMU listens on PATH), ``--listen NAME=PATH``
(the agent listens), ``memd attach`` at run time, and — with ``--libvirt URI`` — every
running libvirt domain that has a memd channel, followed through lifecycle events.
``--swap NAME=SOCKET:SIZE`` serves guest NAME a swap disk over NBD on SOCKET
(memd.nbd), backed by NAME's own tmem client.  ``--metrics HOST:PORT`` serves
Prometheus metrics there (memd.agent.metrics).

KSM knobs: an agent that steers (``--ksm-steer``) puts the host's own back when it
stops; one that was killed left them in a ledger (``hypervisor.ksm``), which the next
agent restores at start, or adopts as the originals if it steers itself.

Persistent tmem state lives in the store (``--store DIR``, default
``$MEMD_RUN_DIR/store`` on tmpfs; ``--durable`` fsyncs each commit): a restarted agent
— after SIGTERM, a crash or ``kill -9`` alike — reopens it and answers guests at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from memd.agent.app import AgentApp
from memd.agent.persistence import open_store

if TYPE_CHECKING:
    from hypervisor.lmdb_store import LmdbStore

log = logging.getLogger("memd.agent")


def serve(args: argparse.Namespace, *, control_path: str) -> int:
    from memd.cli import configure_logging

    configure_logging(args.log_level, args.log_json)
    _tune_malloc()
    return asyncio.run(_serve(args, control_path))


def _tune_malloc() -> None:
    """Keep batch-sized buffers (a 128-page frame is 512 KiB) on the heap.

    glibc serves allocations above its mmap threshold (128 KiB at start) with mmap and
    gives them back on free, so every batch frame would cost an mmap, a munmap and a
    page fault per 4 KiB.  Raising the mmap and trim thresholds keeps those buffers
    in the heap for reuse.  Only on glibc; MEMD_NO_MALLOPT=1 skips it.
    """
    if os.environ.get("MEMD_NO_MALLOPT"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 8 << 20)
        libc.mallopt(m_trim_threshold, 64 << 20)
    except (OSError, AttributeError):
        log.debug("not glibc: malloc thresholds left alone")


async def _serve(args: argparse.Namespace, control_path: str) -> int:
    store = open_store(
        args.store, budget_bytes=args.budget, durable=args.durable, control_path=control_path
    )
    try:
        return await _serve_with(args, control_path, store)
    finally:
        if store is not None:
            store.close()


async def _serve_with(args: argparse.Namespace, control_path: str, store: LmdbStore | None) -> int:
    spill_dir = getattr(args, "spill_dir", "")
    app = AgentApp(
        budget_bytes=args.budget,
        guest_cap_bytes=args.guest_cap,
        store=store,
        spill_dir=Path(spill_dir) if spill_dir else None,
        tls_dir=getattr(args, "tls_dir", None),
        libvirt_uri=args.libvirt or None,
    )
    app.catch_signals()
    await app.start(control_path, metrics=getattr(args, "metrics", None))
    if getattr(args, "migrate_listen", None):
        await app.migration.listen(args.migrate_listen)
    for name, path in args.channel:
        await app.agent.add_channel(name, path, mode="connect")
    for name, path in args.listen:
        await app.agent.add_channel(name, path, mode="listen")
    for name, path, size in getattr(args, "swap", []):
        await app.swap.add(name, path, size)
    for name, qmp_path in args.qmp:
        await asyncio.to_thread(_attach_plain_qemu, app, name, qmp_path)
    if getattr(args, "ksm_steer", False):
        await app.real.start_steering()  # its first step adopts a crashed agent's ledger
    else:
        await asyncio.to_thread(_restore_leftover_ksm, app.real.ledger)
    follower = None
    if args.libvirt:
        from memd.libvirt_cli import LibvirtFollower

        follower = LibvirtFollower(app, args.libvirt, match=args.libvirt_match)
        await follower.start()
    log.info("memd agent running (control %s)", control_path)
    try:
        await app.run_until_signalled()
    finally:
        if follower is not None:
            await follower.stop()
    return 0


def _restore_leftover_ksm(ledger: Path) -> None:
    """Put back KSM knobs that an earlier agent changed and never restored (it was
    killed or crashed), since this agent does not steer: the host gets its own back."""
    from hypervisor import ksm
    from memd.errors import MemdError

    try:
        restored = ksm.restore_originals(ledger)
    except MemdError as err:  # tmem and sharing still work: say so, and carry on
        log.error("KSM knobs an earlier agent changed were not restored: %s", err)
        return
    if restored is not None:
        log.warning(
            "restored the KSM knobs an earlier agent left changed (it did not stop cleanly): %s",
            " ".join(f"{k}={v}" for k, v in sorted(restored.items())),
        )


def _attach_plain_qemu(app: AgentApp, name: str, qmp_path: str) -> None:
    """A QEMU started without libvirt: its QMP socket, and the pid that serves it."""
    from hypervisor.procmem import qemu_pid_for_socket
    from hypervisor.qmp import QmpMonitor

    monitor = QmpMonitor.connect(qmp_path)
    app.real.attach(name, qemu_pid_for_socket(qmp_path), monitor)
