"""Prometheus metrics of a running agent: ``memd serve --metrics HOST:PORT``.

Owns the ``/metrics`` endpoint and the mapping from the agent's own figures to metric
names; it owns no figure.  Every value is read at scrape time from where it is kept —
tmem counters in :class:`~tmem.host.TmemHost`, channel and guest counters in the
:class:`~memd.agent.server.Agent`, swap disks' in their servers, KSM's in sysfs, request
latency in :class:`~memd.agent.latency.LatencyHistograms` — by a prometheus-client
custom collector registered in a private :class:`~prometheus_client.CollectorRegistry`
(never the global one: a test process runs many agents), served by prometheus-client's
own HTTP server thread.

Threads.  ``collect`` runs in that server thread, so it reads only what is safe there:

* TmemHost stats, swap-disk stats of the tmem pool, LatencyHistograms, the store's file
  size: each takes its own lock;
* KSM's sysfs counters, ``/proc`` for ksmd's CPU and QEMU's ``ksm_merging_pages``: files;
* what the event loop owns — channels, ``GuestState`` counters, the swap-disk servers,
  the steering mode, the list of attached QEMUs — is copied by a function that runs *on*
  the loop (``asyncio.run_coroutine_threadsafe``, waited for at most
  ``LOOP_TIMEOUT``).  That keeps the loop's hot paths free of locks and mirrors (a
  scrape every few seconds costs one callback), and the copy is consistent.  If the loop
  does not answer in time (it is wedged, or stopping) the scrape still answers, with
  ``memd_agent_loop_responsive 0`` and without the loop's series.

Names follow Prometheus conventions: ``memd_`` prefix, ``_total`` on counters, base
units (``_bytes``, ``_seconds``); page and frame counts are plain numbers.  Labels:
``vm`` (the guest's name), ``pool_kind`` (``ephemeral``, ``persistent``, ``shared``,
``swap_disk``), ``op`` (guest protocol op), ``mode`` (KSM steering mode).
The table of metrics is docs/operators.md §9.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from memd.agent.latency import HistogramSnapshot, LatencyHistograms
from memd.agent.migration import migration_metrics
from memd.errors import BackendError, InvalidArgument, MemdError
from memd.nbd.export import DiskStats
from tmem.types import PAGE_SIZE

if TYPE_CHECKING:
    from memd.agent.app import AgentApp

log = logging.getLogger("memd.agent")

#: How long a scrape waits for the event loop's copy of its state.
LOOP_TIMEOUT = 2.0
#: Every steering mode, so that a dashboard sees a 0 for the modes not in force.
STEERING_MODES = ("off", "starting", "idle", "stalled", "boost")
#: The KSM counters exported as gauges (they go up and down) and as counters.
KSM_GAUGES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9643`` for IPv6) → (host, port); InvalidArgument otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(
            f"--metrics wants HOST:PORT, e.g. 127.0.0.1:9643, not {text!r}", op="metrics"
        )
    return host, int(port)


@dataclass(frozen=True)
class GuestRow:
    """One guest's agent-side figures, copied on the event loop."""

    name: str
    attached: bool
    connected: bool
    requests: int
    errors: int
    bad_frames: int
    disconnects: int
    reboots: int
    #: The guest daemon's last MEM_REPORT (memd.agent.dispatch.GuestState.memory_dict).
    memory: dict[str, object] | None = None


@dataclass(frozen=True)
class LoopSnapshot:
    """What the event loop owns, as one scrape sees it."""

    guests: tuple[GuestRow, ...]
    attached: int
    connected: int
    disk_pools: dict[str, int]
    disks: tuple[tuple[str, DiskStats, int], ...]  # (vm, stats, connections)
    steering_mode: str
    qemu_pids: dict[str, int]  # attached QEMU guests: vm → QEMU's pid
    migrations: dict[str, Any]  # MigrationService.status() (issue 14)


def snapshot_loop(app: AgentApp) -> LoopSnapshot:
    """Copy the loop-owned state (event loop thread only)."""
    agent = app.agent
    rows = []
    for name, guest in sorted(agent.guests.items()):
        channel = agent.channels.get(name)
        rows.append(
            GuestRow(
                name,
                channel is not None,
                guest.connected,
                guest.requests,
                guest.errors,
                guest.bad_frames,
                guest.disconnects,
                guest.reboots,
                guest.memory_dict(),
            )
        )
    return LoopSnapshot(
        guests=tuple(rows),
        attached=len(agent.channels),
        connected=sum(1 for c in agent.channels.values() if c.guest.connected),
        disk_pools=dict(app.dispatcher.disk_pools),
        disks=tuple(
            (name, server.disk.stats(name), len(server.connections))
            for name, server in sorted(app.swap.disks.items())
        ),
        steering_mode=app.real.steering_mode(),
        qemu_pids=app.real.qemu_pids(),
        migrations=app.migration.status(),
    )


class AgentCollector(Collector):
    """Yields the agent's metrics at scrape time (see the module docstring)."""

    def __init__(
        self, app: AgentApp, loop: asyncio.AbstractEventLoop, *, loop_timeout: float = LOOP_TIMEOUT
    ) -> None:
        self.app = app
        self.loop = loop
        self.loop_timeout = loop_timeout

    def collect(self) -> Iterable[Metric]:
        snap = self._loop_snapshot()
        yield GaugeMetricFamily(
            "memd_agent_loop_responsive",
            "1 if the event loop answered this scrape in time",
            value=1 if snap is not None else 0,
        )
        yield from self._tmem(snap)
        if snap is not None:
            yield from self._agent(snap)
            yield from self._disks(snap)
            yield from migration_metrics(snap.migrations)
        yield from _latency(self.app.dispatcher.latency)
        yield from self._sharing(snap)

    def _loop_snapshot(self) -> LoopSnapshot | None:
        async def take() -> LoopSnapshot:
            return snapshot_loop(self.app)

        if self.loop.is_closed():
            return None
        future = asyncio.run_coroutine_threadsafe(take(), self.loop)
        try:
            return future.result(self.loop_timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            log.warning("metrics: the event loop did not answer within %.1f s", self.loop_timeout)
            return None

    # -- tmem ------------------------------------------------------------------------------

    def _tmem(self, snap: LoopSnapshot | None) -> Iterator[Metric]:
        tmem = self.app.tmem
        store = tmem.store_stats()
        for name, doc, value in (
            ("memd_tmem_budget_bytes", "the tmem store's memory budget", store.budget_bytes),
            (
                "memd_tmem_used_bytes",
                "what the budget is charged (data and metadata)",
                store.used_bytes,
            ),
            (
                "memd_tmem_data_bytes",
                "stored page payloads (compressed, de-duplicated)",
                store.data_bytes,
            ),
            ("memd_tmem_metadata_bytes", "metadata of the stored pages", store.metadata_bytes),
            ("memd_tmem_unique_blobs", "distinct stored page contents", store.unique_blobs),
            ("memd_tmem_zero_pages", "pages stored as the zero page", store.zero_pages),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "memd_tmem_dedup_hits",
            "puts that found their content already stored",
            value=store.dedup_hits,
        )
        if self.app.store is not None:
            yield GaugeMetricFamily(
                "memd_store_file_bytes",
                "size of the crash-safe store's data file",
                value=self.app.store.file_bytes(),
            )

        disk_pools = snap.disk_pools if snap is not None else {}
        pages = GaugeMetricFamily(
            "memd_tmem_pages",
            "pages a guest's pools hold (a shared pool's under each member)",
            labels=["vm", "pool_kind"],
        )
        raw = GaugeMetricFamily(
            "memd_tmem_bytes", "uncompressed size of those pages", labels=["vm", "pool_kind"]
        )
        stored = GaugeMetricFamily(
            "memd_tmem_stored_bytes",
            "what those pages take in the "
            "store (compressed; de-duplicated content counted per "
            "page)",
            labels=["vm", "pool_kind"],
        )
        by_kind: dict[tuple[str, str], list[int]] = {}
        for pool in tmem.pool_stats(None):
            kind = (
                "swap_disk"
                if disk_pools.get(pool.client) == pool.pool_id
                else "shared"
                if pool.shared
                else pool.kind
            )
            acc = by_kind.setdefault((pool.client, kind), [0, 0, 0])
            acc[0] += pool.pages
            acc[1] += pool.bytes_raw
            acc[2] += pool.bytes_stored
        for labels, (n, r, s) in sorted(by_kind.items()):
            pages.add_metric(labels, n)
            raw.add_metric(labels, r)
            stored.add_metric(labels, s)
        yield from (pages, raw, stored)

        counters = {
            "puts": ("put attempts (batched pages counted one by one)", "puts"),
            "stored_puts": ("puts that stored the page", "good_puts"),
            "gets": ("get attempts", "gets"),
            "get_hits": ("gets that returned a page", "found_gets"),
            "flushes": ("pages removed by flush page/object/pool", "flushes"),
            "evictions": ("ephemeral pages the host reclaimed", "evictions"),
            "no_space": (
                "puts refused with NO_SPACE (the guest's cap or the store full)",
                "no_space",
            ),
        }
        families = {
            k: CounterMetricFamily(f"memd_tmem_{k}", doc, labels=["vm"])
            for k, (doc, _) in counters.items()
        }
        misses = CounterMetricFamily(
            "memd_tmem_get_misses", "gets that found no page", labels=["vm"]
        )
        cap = GaugeMetricFamily(
            "memd_tmem_cap_bytes", "the guest's cap (pages × 4 KiB; absent: no cap)", labels=["vm"]
        )
        charged = GaugeMetricFamily(
            "memd_tmem_charged_bytes",
            "what counts against the cap: pages the guest owns × 4 KiB",
            labels=["vm"],
        )
        frozen = GaugeMetricFamily(
            "memd_tmem_frozen", "1 while the host refuses the guest's puts", labels=["vm"]
        )
        for client in tmem.client_stats(None):
            vm = [client.client]
            ops = client.ops
            for key, (_, field_name) in counters.items():
                families[key].add_metric(vm, getattr(ops, field_name))
            misses.add_metric(vm, ops.gets - ops.found_gets)
            if client.cap_pages is not None:
                cap.add_metric(vm, client.cap_pages * PAGE_SIZE)
            charged.add_metric(vm, (client.ephemeral_pages + client.persistent_pages) * PAGE_SIZE)
            frozen.add_metric(vm, int(client.frozen))
        yield from families.values()
        yield from (misses, cap, charged, frozen)

    # -- agent -----------------------------------------------------------------------------

    def _agent(self, snap: LoopSnapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("memd_agent_guests", "guest channels attached", value=snap.attached)
        yield GaugeMetricFamily(
            "memd_agent_connected_guests",
            "guest channels with a connected guest",
            value=snap.connected,
        )
        connected = GaugeMetricFamily(
            "memd_agent_guest_connected", "1 while the guest's channel is connected", labels=["vm"]
        )
        families = {
            "requests": CounterMetricFamily(
                "memd_agent_requests", "frames the guest sent", labels=["vm"]
            ),
            "errors": CounterMetricFamily(
                "memd_agent_request_errors", "requests answered with an error status", labels=["vm"]
            ),
            "bad_frames": CounterMetricFamily(
                "memd_agent_bad_frames", "corrupt or malformed frames", labels=["vm"]
            ),
            "disconnects": CounterMetricFamily(
                "memd_agent_disconnects", "connections that ended", labels=["vm"]
            ),
            "reboots": CounterMetricFamily(
                "memd_agent_guest_reboots", "reboots seen (a new boot id in HELLO)", labels=["vm"]
            ),
        }
        for row in snap.guests:
            if row.attached:
                connected.add_metric([row.name], int(row.connected))
            for key, family in families.items():
                family.add_metric([row.name], getattr(row, key))
        yield connected
        yield from families.values()
        yield from _guest_memory(snap)

    def _disks(self, snap: LoopSnapshot) -> Iterator[Metric]:
        gauges = {
            "size": ("memd_swap_disk_size_bytes", "the disk's size"),
            "pages": ("memd_swap_disk_pages", "pages written and not trimmed"),
            "bytes_stored": ("memd_swap_disk_stored_bytes", "what they take in the store"),
            "spilled_pages": ("memd_swap_disk_spilled_pages", "pages in the spill file now"),
            "lost_pages": ("memd_swap_disk_lost_pages", "pages a crash lost (reads: EIO)"),
        }
        counters = {
            "reads": ("memd_swap_disk_reads", "NBD read requests"),
            "writes": ("memd_swap_disk_writes", "NBD write requests"),
            "trims": ("memd_swap_disk_trims", "NBD trim requests"),
            "errors": ("memd_swap_disk_errors", "requests answered with an error"),
        }
        gfam = {k: GaugeMetricFamily(n, d, labels=["vm"]) for k, (n, d) in gauges.items()}
        cfam = {k: CounterMetricFamily(n, d, labels=["vm"]) for k, (n, d) in counters.items()}
        conns = GaugeMetricFamily(
            "memd_swap_disk_connections", "NBD connections open", labels=["vm"]
        )
        for name, stats, connections in snap.disks:
            for key, gauge in gfam.items():
                gauge.add_metric([name], getattr(stats, key))
            for key, counter in cfam.items():
                counter.add_metric([name], getattr(stats, key))
            conns.add_metric([name], connections)
        yield from gfam.values()
        yield from cfam.values()
        yield conns

    # -- sharing and KSM -------------------------------------------------------------------

    def _sharing(self, snap: LoopSnapshot | None) -> Iterator[Metric]:
        from hypervisor import ksm
        from hypervisor.ksm_steer import ksmd_cpu_seconds

        if snap is not None:
            mode = GaugeMetricFamily(
                "memd_ksm_steering_mode", "1 for the KSM steering mode in force", labels=["mode"]
            )
            for m in STEERING_MODES:
                mode.add_metric([m], int(m == snap.steering_mode))
            yield mode
        if ksm.available():
            try:
                counters = ksm.counters()
                run = ksm.get("run")
            except MemdError:
                counters, run = {}, None
            for key in KSM_GAUGES:
                if key in counters:
                    yield GaugeMetricFamily(
                        f"memd_ksm_{key}", f"KSM's {key} (host-wide)", value=counters[key]
                    )
            if "full_scans" in counters:
                yield CounterMetricFamily(
                    "memd_ksm_full_scans",
                    "ksmd's passes over the mergeable memory",
                    value=counters["full_scans"],
                )
            if isinstance(run, int):
                yield GaugeMetricFamily(
                    "memd_ksm_run", "KSM's run knob (0 stop, 1 merge, 2 unmerge)", value=run
                )
            yield CounterMetricFamily(
                "memd_ksmd_cpu_seconds", "CPU time of the ksmd thread", value=ksmd_cpu_seconds()
            )

        steering = self.app.real.steering
        last = steering.last if steering is not None else None
        if last is not None:
            yield GaugeMetricFamily(
                "memd_ksm_steering_potential_saved_frames",
                "frames KSM "
                "would save merging every duplicate of the opted-in "
                "guests (steering's last scan)",
                value=last.potential_saved_frames,
            )
            yield GaugeMetricFamily(
                "memd_ksm_steering_realized_saved_frames",
                "frames their merged pages save (pagemap, steering's last step)",
                value=last.realized_saved_frames,
            )
        potential = steering.potential if steering is not None else None
        if potential is not None:
            pot = GaugeMetricFamily(
                "memd_sharing_potential_saved_frames",
                "the guest's share "
                "of the frames merging every duplicate would save (last "
                "scan; the guests' shares add up to the host's)",
                labels=["vm"],
            )
            real = GaugeMetricFamily(
                "memd_sharing_realized_saved_frames",
                "the guest's share of the frames merged pages save (pagemap, last scan)",
                labels=["vm"],
            )
            for v in potential.vms:
                pot.add_metric([v.name], v.potential_saved)
                real.add_metric([v.name], v.realized_saved)
            yield from (pot, real)
        if snap is not None and snap.qemu_pids:
            merged = GaugeMetricFamily(
                "memd_ksm_merging_pages",
                "the guest's pages KSM has merged now (/proc/PID/ksm_merging_pages)",
                labels=["vm"],
            )
            for vm, pid in sorted(snap.qemu_pids.items()):
                try:
                    merged.add_metric([vm], ksm.process_merging_pages(pid))
                except MemdError:
                    continue  # its QEMU is gone: the follower detaches it soon
            yield merged
        if self.app.sharing is not None:
            # The manager's own stats (under machine.lock), not SharingService.stats(),
            # which also walks the service's loop-owned guest table.
            stats = self.app.sharing.manager.stats()
            yield GaugeMetricFamily(
                "memd_sharing_sim_saved_frames",
                "frames the simulated guests' sharing manager saves",
                value=stats["nr_saved_mfns"],
            )


def _guest_memory(snap: LoopSnapshot) -> Iterator[Metric]:
    """What each guest's daemon last reported of its memory (MEM_REPORT): the host's view
    of a guest's memory pressure.  Guests without a report have no series."""
    kib = {
        "mem_total_kib": ("memd_guest_memory_total_bytes", "the guest's MemTotal"),
        "mem_available_kib": ("memd_guest_memory_available_bytes", "the guest's MemAvailable"),
        "swap_total_kib": ("memd_guest_swap_total_bytes", "the guest's SwapTotal"),
        "swap_free_kib": ("memd_guest_swap_free_bytes", "the guest's SwapFree"),
    }
    gauges = {
        key: GaugeMetricFamily(name, text, labels=["vm"]) for key, (name, text) in kib.items()
    }
    psi = GaugeMetricFamily(
        "memd_guest_memory_pressure_ratio",
        "the guest's PSI memory avg10 (0..1; kind some or full), when its kernel has PSI",
        labels=["vm", "kind"],
    )
    age = GaugeMetricFamily(
        "memd_guest_memory_report_age_seconds",
        "seconds since the guest's last memory report",
        labels=["vm"],
    )
    for row in snap.guests:
        m = row.memory
        if m is None:
            continue
        for key, gauge in gauges.items():
            gauge.add_metric([row.name], float(m[key]) * 1024)  # type: ignore[arg-type]
        for kind in ("some", "full"):
            value = m[f"psi_{kind}_avg10"]
            if value is not None:
                psi.add_metric([row.name, kind], float(value) / 100)  # type: ignore[arg-type]
        age.add_metric([row.name], float(m["age_s"]))  # type: ignore[arg-type]
    yield from gauges.values()
    yield psi
    yield age


def _latency(histograms: LatencyHistograms) -> Iterator[Metric]:
    family = HistogramMetricFamily(
        "memd_agent_request_duration_seconds",
        "time to handle one guest request, per op (dispatch; not the shared store commit)",
        labels=["op"],
    )
    for op, snap in sorted(histograms.snapshot().items()):
        family.add_metric([op], _buckets(histograms.buckets, snap), snap.total_seconds)
    yield family


def _buckets(bounds: tuple[float, ...], snap: HistogramSnapshot) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, n in zip(bounds, snap.counts, strict=False):
        running += n
        out.append((repr(bound), float(running)))
    out.append(("+Inf", float(snap.count)))
    return out


class MetricsServer:
    """The ``/metrics`` HTTP endpoint: prometheus-client's server on its own thread.

    Started and stopped on the event loop thread (:meth:`AgentApp.start` / ``stop``)."""

    def __init__(self, app: AgentApp, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = AgentCollector(app, asyncio.get_running_loop())
        self.registry.register(self.collector)
        try:
            self._server, self._thread = _start(port, host, self.registry)
        except OSError as err:
            raise BackendError(
                f"cannot serve metrics on {host}:{port}: {err.strerror or err}",
                target=f"{host}:{port}",
            ) from None
        self.host, self.port = host, int(self._server.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/metrics"
        log.info("metrics on %s", self.url, extra={"event": "metrics"})

    def close(self) -> None:
        """Stop serving (blocking: waits for a scrape in progress; call in a thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _start(
    port: int, host: str, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    return start_http_server(port, host, registry=registry)
