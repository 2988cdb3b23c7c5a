"""`memd demo`: the whole product on the embedded default, in seconds.

It starts the host agent (asyncio, in a background thread) on the in-process
machine, creates several simulated guests whose RAM lives in that machine, and lets
each guest talk to the agent over its own real unix socket with the real protocol
(``memd.guest.client``): tmem pools, batched puts and gets checked byte for byte,
flushes, sharing queries and nominations.  Guest memory is filled with the
duplication real guests show (a common kernel image, zero pages, per-guest data);
the sharing scanner merges what is identical, guests then write to some shared pages
(copy-on-write unshares them) and the final audit recomputes every counter.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from memd.agent.app import AgentApp
from memd.agent.commands import AuditArgs
from memd.errors import MemdError
from memd.guest.client import GuestClient
from memd.wire import ALL_CAPABILITIES, Capability, ShareState, Status

PAGE = 4096


@dataclass
class DemoConfig:
    guests: int = 4
    guest_pages: int = 4096  # 16 MiB of RAM per guest
    tmem_pages: int = 2048  # pages each guest puts through tmem
    budget_mib: int = 64


class _LoopThread:
    """An asyncio loop in a daemon thread; run coroutines on it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="memd-agent", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _guest_ram(rng: random.Random, guest: int, pages: int, kernel: np.ndarray) -> np.ndarray:
    """RAM of one idle guest: ~25% zero, a shared kernel image, the rest its own data."""
    ram = np.zeros((pages, PAGE), dtype=np.uint8)
    nk = min(len(kernel), pages // 4)
    ram[pages // 4 : pages // 4 + nk] = kernel[:nk]
    own_start = pages // 4 + nk
    gen = np.random.default_rng(rng.randrange(1 << 30) + guest)
    own = gen.integers(0, 256, size=(pages - own_start, PAGE), dtype=np.uint8)
    own[:, 2048:] = 0  # half-filled pages: compressible
    ram[own_start:] = own
    # Duplicates inside the guest: page-cache copies of the same file blocks.
    for i in range(0, (pages - own_start) // 8):
        ram[own_start + 8 * i + 1] = ram[own_start + 8 * i]
    return ram


def _page(seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"ext4", b"inode", b"dentry", b"slab", b"\x00" * 16, b"libc.so.6", b"page"]
    body = b" ".join(rng.choice(words) for _ in range(700))
    return body[:PAGE].ljust(PAGE, b"\x00")


def _guest_workload(
    name: str, path: str, cfg: DemoConfig, common: list[bytes], ram_pages: int
) -> dict[str, Any]:
    """What one simulated guest does over its channel; returns its own checks."""
    seed = sum(name.encode())
    client = GuestClient.for_unix_socket(
        path, boot_id=os.urandom(16), capabilities=ALL_CAPABILITIES | int(Capability.DEDUP_OPT_IN)
    )
    with client:
        client.connect()
        eph = client.new_pool()
        pers = client.new_pool(persistent=True)
        # A page cache where a third of the pages are the same in every guest.
        pages = [
            common[i % len(common)] if i % 3 == 0 else _page(seed * 100_000 + i)
            for i in range(cfg.tmem_pages)
        ]
        pages[::7] = [bytes(PAGE)] * len(pages[::7])
        items = [(i // 64, i % 64, p) for i, p in enumerate(pages)]
        put = client.put_batch(pers, items)
        stored = sum(1 for s in put if s == Status.OK)
        got = client.get_batch(pers, [(o, i) for o, i, _ in items])
        mismatches = sum(
            1 for g, (_, _, p), s in zip(got, items, put, strict=True) if s == Status.OK and g != p
        )
        client.put_batch(eph, items[: cfg.tmem_pages // 2])
        eph_hits = sum(
            1 for g in client.get_batch(eph, [(o, i) for o, i, _ in items[:256]]) if g is not None
        )
        client.flush_object(pers, 0)
        flushed_gone = client.get(pers, 0, 1) is None
        # Sharing: nominate a few of our own kernel pages, query their state.
        nominated = client.nominate(list(range(ram_pages // 4, ram_pages // 4 + 16)))
        stats = client.stats()
        return {
            "guest": name,
            "puts": len(items),
            "stored": stored,
            "mismatches": mismatches,
            "ephemeral_hits": eph_hits,
            "flush_verified": flushed_gone,
            "nominated": sum(1 for r in nominated if r.status == Status.OK),
            "host_requests": stats.get("requests"),
        }


def run_demo(cfg: DemoConfig | None = None, *, progress: Any = None) -> dict[str, Any]:
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    rng = random.Random(42)
    frames = cfg.guests * cfg.guest_pages + 1024
    app = AgentApp(budget_bytes=cfg.budget_mib << 20, sim_frames=frames)
    assert app.machine is not None and app.sharing is not None
    machine, sharing = app.machine, app.sharing
    loop = _LoopThread()
    tmpdir = tempfile.TemporaryDirectory(prefix="memd-demo-")
    try:
        loop.run(app.start(None))
        kernel_gen = np.random.default_rng(7)
        kernel = kernel_gen.integers(0, 256, size=(cfg.guest_pages // 4, PAGE), dtype=np.uint8)
        kernel[:, 3000:] = 0
        names = [f"guest{i}" for i in range(cfg.guests)]
        paths = {}
        say(
            f"starting {cfg.guests} simulated guests with {cfg.guest_pages * PAGE >> 20} MiB "
            "RAM each"
        )
        for i, name in enumerate(names):
            domid = machine.create_domain(cfg.guest_pages)
            machine.fill(domid, 0, _guest_ram(rng, i, cfg.guest_pages, kernel))
            sharing.bind(name, domid)
            paths[name] = os.path.join(tmpdir.name, f"{name}.sock")
            loop.run(app.agent.add_channel(name, paths[name], mode="listen"))

        say("guests put and get pages through tmem over their channels")
        common = [_page(i) for i in range(32)]
        results: dict[str, dict[str, Any]] = {}
        errors: list[str] = []

        def guest_thread(name: str) -> None:
            try:
                results[name] = _guest_workload(name, paths[name], cfg, common, cfg.guest_pages)
            except (MemdError, OSError, AssertionError) as err:
                errors.append(f"{name}: {err}")

        threads = [threading.Thread(target=guest_thread, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        say("sharing scan: hashing guest RAM, merging identical pages")
        scan = sharing.scan()

        say("guests write to shared pages (copy-on-write) and ask about their state")
        domid0 = sharing.domid(names[0])
        cow_gfn = cfg.guest_pages // 4 + 100  # a kernel page the scanner merged
        before = machine.read(domid0, cow_gfn)
        # Still consenting to cross-guest merging: a HELLO without DEDUP_OPT_IN would
        # give guest0's merged pages private copies at once (sharing.consent).
        client = GuestClient.for_unix_socket(
            paths[names[0]],
            boot_id=os.urandom(16),
            capabilities=ALL_CAPABILITIES | int(Capability.DEDUP_OPT_IN),
        )
        with client:
            client.connect()
            state_before = client.share_query([cow_gfn])[0]
            client.about_to_write(cow_gfn)
            machine.write(domid0, cow_gfn, b"written by guest0")
            state_after = client.share_query([cow_gfn])[0]
        for name in names[1:]:  # a plain write faults and unshares by itself
            machine.write(sharing.domid(name), cow_gfn + 2, b"copy on write")
        other = machine.read(sharing.domid(names[1]), cow_gfn)
        audit = app.handlers.audit(AuditArgs())
        sharing_stats = sharing.stats()
        tmem = app.tmem.store_stats().to_dict()
        summary = {
            "guests": cfg.guests,
            "seconds": round(time.perf_counter() - t0, 2),
            "guest_results": [results[n] for n in names if n in results],
            "guest_errors": errors,
            "byte_mismatches": sum(r["mismatches"] for r in results.values()),
            "scan": scan,
            "cow": {
                "gfn": cow_gfn,
                "state_before": ShareState(state_before.state).name,
                "share_count_before": state_before.share_count,
                "state_after": ShareState(state_after.state).name,
                "other_guest_kept_original": other == before,
            },
            "sharing": {
                "saved_frames": sharing_stats["nr_saved_mfns"],
                "shared_frames": sharing_stats["nr_shared_mfns"],
                "saved_mib": round(sharing_stats["nr_saved_mfns"] * PAGE / (1 << 20), 1),
                "guest_ram_mib": cfg.guests * cfg.guest_pages * PAGE >> 20,
            },
            "tmem": tmem,
            "audit": audit,
        }
        return summary
    finally:
        try:
            loop.run(app.stop())
        finally:
            loop.close()
            tmpdir.cleanup()


def format_summary(s: dict[str, Any]) -> str:
    t, sh, audit = s["tmem"], s["sharing"], s["audit"]
    lines = [f"memd demo: {s['guests']} guests in {s['seconds']} s", ""]
    lines.append(
        f"{'guest':8} {'puts':>6} {'stored':>6} {'bad bytes':>9} {'eph hits':>8} {'nominated':>9}"
    )
    for r in s["guest_results"]:
        lines.append(
            f"{r['guest']:8} {r['puts']:6} {r['stored']:6} {r['mismatches']:9} "
            f"{r['ephemeral_hits']:8} {r['nominated']:9}"
        )
    for err in s["guest_errors"]:
        lines.append(f"  error: {err}")
    ratio = t["used_bytes"] / max(1, t["pages"] * PAGE)
    lines += [
        "",
        f"tmem     {t['pages']} pages held in {t['used_bytes'] >> 10} KiB "
        f"({ratio:.0%} of raw), {t['zero_pages']} zero pages, {t['dedup_hits']} dedup hits, "
        f"{t['evictions']} evictions",
        f"sharing  {sh['saved_frames']} frames saved ({sh['saved_mib']} MiB of "
        f"{sh['guest_ram_mib']} MiB guest RAM), {sh['shared_frames']} shared frames",
        f"cow      gfn {s['cow']['gfn']}: {s['cow']['state_before']} "
        f"x{s['cow']['share_count_before']} -> {s['cow']['state_after']} after write; "
        f"other guests kept the original: {s['cow']['other_guest_kept_original']}",
        f"audit    {'clean' if audit['clean'] else 'NOT CLEAN'}: {audit['errors']} errors "
        f"(tmem {audit['tmem']['errors']}, sharing "
        f"{audit['sharing']['errors'] if audit['sharing'] else 0})",
    ]
    for finding in audit["tmem"]["findings"][:10]:
        lines.append(f"  tmem: {finding}")
    if audit["sharing"]:
        for f in audit["sharing"]["findings"][:10]:
            lines.append(f"  sharing: {f}")
    return "\n".join(lines)
