"""The agent's persistent state: opening the crash-safe store, rebuilding from it at
start, and the agent's own records in it.

Owns the agent's side of :class:`~hypervisor.lmdb_store.LmdbStore`.  The tmem host
writes its pages and client records through the store itself (the store is its
``PersistentLog``); what the agent adds is read back here when an agent starts on a
store an earlier agent left (after SIGTERM, a crash or ``kill -9`` alike):

* guests' boot ids and reboot counts, from their tmem client records (so a guest that
  reconnects with the same boot id keeps its pools, and a new one counts as a reboot);
* the VMs the operator opted out of KSM merging (meta record ``opted_out``).

There is no other restart mechanism.  Threads: :meth:`AgentStore.reopen` runs once, in
the constructor of the agent, before any thread or loop uses the tmem host; the
store serialises its own writes (``LmdbStore._lock``), so :meth:`save_opted_out` may
be called from any thread — its caller (memd.agent.real_guests) calls it under the lock
that serialises changes of the opted-out set, so records are written in their order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memd import paths
from memd.agent.dispatch import GuestState

if TYPE_CHECKING:
    from hypervisor.lmdb_store import LmdbStore
    from tmem.host import TmemHost

log = logging.getLogger("memd.agent")

#: The store's meta record that lists the VMs the operator opted out of KSM merging.
OPTED_OUT_KEY = "opted_out"


def open_store(
    path: str | None, *, budget_bytes: int, durable: bool, control_path: str
) -> LmdbStore | None:
    """The persistent tmem store at *path* (None: the default, on tmpfs); None for ``''``
    (``serve --store ''``: pages die with the agent)."""
    from hypervisor.lmdb_store import LmdbStore

    where = paths.tmem_store() if path is None else path
    if not where:
        log.warning("no tmem store: persistent pages die with this process")
        return None
    return LmdbStore(
        where,
        budget_bytes=budget_bytes,
        durable=durable,
        control_path=control_path,
        host_boot_id=paths.host_boot_id(),
    )


@dataclass
class Reopened:
    """What an agent gets back from the store of an earlier one."""

    #: Guests known from their tmem client records: boot id and reboot count.
    guests: dict[str, GuestState] = field(default_factory=dict)
    #: The VMs the operator had opted out of KSM merging.
    opted_out: set[str] = field(default_factory=set)


class AgentStore:
    """The agent's records in the store; a store of None keeps nothing (every method is
    then a no-op and a restart starts empty)."""

    def __init__(self, store: LmdbStore | None) -> None:
        self.store = store

    def reopen(self, tmem: TmemHost) -> Reopened:
        """Rebuild *tmem* from the store; → the guests and opt-outs it recorded."""
        out = Reopened()
        if self.store is None:
            return out
        t0 = time.monotonic()
        state = self.store.load()
        for finding in tmem.restore(state):
            log.error("tmem store: %s", finding, extra={"event": "store-repair"})
        for name in tmem.client_names():
            meta = tmem.client_meta(name)
            if "boot_id" in meta:
                out.guests[name] = GuestState(
                    name,
                    boot_id=bytes.fromhex(str(meta["boot_id"])),
                    reboots=int(meta.get("reboots", 0)),
                )
        out.opted_out = {str(vm) for vm in state.meta.get(OPTED_OUT_KEY, [])}
        stats = tmem.store_stats()
        log.info(
            "tmem store %s: %d guests, %d persistent pages back in %.2f s",
            self.store.path,
            len(tmem.client_names()),
            stats.persistent_pages,
            time.monotonic() - t0,
            extra={"event": "store-reopened"},
        )
        return out

    def save_opted_out(self, vms: Iterable[str]) -> None:
        """Record the opted-out VMs (the whole set: the record is replaced)."""
        if self.store is not None:
            self.store.put_meta(OPTED_OUT_KEY, sorted(vms))

    def describe(self) -> dict[str, Any] | None:
        """The store as `memd status` shows it; None without one."""
        if self.store is None:
            return None
        return {
            "path": str(self.store.path),
            "durable": self.store.durable,
            "bytes_used": self.store.bytes_used(),
            "file_bytes": self.store.file_bytes(),
        }
