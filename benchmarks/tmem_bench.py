"""tmem throughput and metadata cost on a realistic page mix.

The mix follows what an idle Linux guest's memory looks like (design notes: ~60%
zero pages, lz4 output ~19% of input); we use a harsher default so that the store
cannot win on zero pages alone:

  35% zero · 20% duplicates of 64 common pages · 35% text-like compressible · 10% random

Everything is measured in one run, side by side with lz4 on the same pages, so the
ratios mean something on a noisy machine.  ``--json`` prints one JSON object.

Persistent pools with the crash-safe store (``hypervisor.lmdb_store``) are measured on
the same pages: on tmpfs (``--store-dir``, default under /dev/shm) as ``memd serve``
runs by default, and with ``--durable`` (fsync per commit) in a directory on disk
(``--durable-dir``, default under /var/tmp); ``reopen_seconds_per_million_pages`` is a
restart: open the store and rebuild the host from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lz4.block

from hypervisor.lmdb_store import LmdbStore
from tmem.host import TmemHost
from tmem.types import PAGE_SIZE, PoolFlag

_WORDS = [
    b"the",
    b"kernel",
    b"page",
    b"memory",
    b"guest",
    b"host",
    b"virtio",
    b"struct",
    b"return",
    b"static",
    b"int",
    b"void",
    b"if",
    b"else",
    b"0x0000",
    b"ffff",
    b"lock",
    b"unlock",
    b"tmem",
    b"pool",
    b"object",
    b"index",
    b"\x00\x00\x00\x00",
    b"\n",
    b"    ",
]


def make_mix(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    common = [_text_page(rng) for _ in range(64)]
    pages = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            pages.append(bytes(PAGE_SIZE))
        elif r < 0.55:
            pages.append(rng.choice(common))
        elif r < 0.90:
            pages.append(_text_page(rng))
        else:
            pages.append(rng.randbytes(PAGE_SIZE))
    return pages


def _text_page(rng: random.Random) -> bytes:
    # ~900 tokens; a tenth carry two random bytes, like pointers in a text/data page.
    tokens = rng.choices(_WORDS, k=900)
    for i in rng.sample(range(900), 90):
        tokens[i] += rng.randbytes(2)
    return b" ".join(tokens)[:PAGE_SIZE].ljust(PAGE_SIZE, b"\x00")


def guest_ram_pages(which: str, settle_s: float = 8.0) -> tuple[list[bytes], dict[str, object]]:
    """The pages of a real guest: the memd image booted under TCG (256 MiB), read through
    /proc/<pid>/mem after it settles.  ``which="all"``: every gfn, never-touched pages
    reading as zero (the "idle guest, ~60% zero pages" of the design notes);
    ``"present"``: only pages the guest has touched.  Needs root and QEMU."""
    import tempfile

    import numpy as np

    from hypervisor.qemu_machine import QemuMachine
    from hypervisor.vmimage import ensure_image
    from hypervisor.vmlaunch import LaunchedVm

    image = ensure_image()
    with tempfile.TemporaryDirectory(prefix="memd-bench-") as tmp:
        vm = LaunchedVm(image, Path(tmp), name="bench")
        machine = QemuMachine()
        try:
            launched = time.monotonic()
            vm.boot()  # to the shell: ~4 s under TCG
            time.sleep(max(0.0, settle_s - (time.monotonic() - launched)))  # then idle
            domid = machine.attach("bench", vm.pid, vm.monitor)
            if which == "present":
                gfns = np.flatnonzero(machine.p2m(domid) >= 0)
            else:  # every RAM gfn of the layout QEMU reports (holes excluded)
                gfns = np.concatenate(
                    [
                        np.arange(r.gfn, r.gfn + r.pages, dtype=np.int64)
                        for r in machine.guest(domid).layout.ranges
                    ]
                )
            rows = machine.read_gfns(domid, gfns)
            pages = [rows[i].tobytes() for i in range(len(rows))]
        finally:
            machine.close()
            vm.stop()
    zero = sum(1 for p in pages if p == bytes(PAGE_SIZE))
    return pages, {
        "source": f"guest RAM, {which} pages (memd image, 256 MiB, TCG, idle)",
        "present_pages": len(pages),
        "zero": round(zero / max(1, len(pages)), 3),
        "distinct": round(len(set(pages)) / max(1, len(pages)), 3),
    }


def best_of(runs: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def persistent(
    pages: list[bytes],
    handles: list[tuple[tuple[int, int, int], int]],
    batch: int,
    runs: int,
    store_dir: str,
    durable_dir: str,
) -> dict[str, object]:
    """Put/get through the LMDB store on tmpfs, reopen, and put with --durable on disk."""
    n = len(pages)
    budget = 1 << 36

    def fill(
        where: str, durable: bool, count: int = n, batched: bool = True
    ) -> tuple[float, TmemHost, LmdbStore]:
        shutil.rmtree(where, ignore_errors=True)
        gc.collect()
        store = LmdbStore(where, budget_bytes=budget, durable=durable)
        host = TmemHost(budget_bytes=budget, log=store)
        host.add_client("bench", dedup=True)
        pool = host.new_pool("bench", PoolFlag.PERSISTENT)
        t0 = time.perf_counter()
        if batched:
            for i in range(0, count, batch):
                host.put_batch("bench", pool, handles[i : i + batch], pages[i : i + batch])
        else:  # one page, one commit
            for (oid, index), page in zip(handles[:count], pages[:count], strict=True):
                host.put("bench", pool, oid, index, page)
        return time.perf_counter() - t0, host, store

    tmp = tempfile.mkdtemp(prefix="memd-bench-store-", dir=store_dir)
    disk = tempfile.mkdtemp(prefix="memd-bench-durable-", dir=durable_dir)
    try:
        best = float("inf")
        host: TmemHost | None = None
        store: LmdbStore | None = None
        for _ in range(runs):
            if store is not None:
                store.close()
            elapsed, host, store = fill(os.path.join(tmp, "s"), False)
            best = min(best, elapsed)
        assert host is not None and store is not None

        def get_batched() -> None:
            for i in range(0, n, batch):
                got = host.get_batch("bench", 0, handles[i : i + batch])
                assert got[0] == pages[i]

        t_get = best_of(runs, get_batched)
        file_bytes, used = store.file_bytes(), host.store_stats().used_bytes
        assert host.audit() == []
        store.close()
        t_reopen = float("inf")
        for _ in range(runs):
            gc.collect()
            t0 = time.perf_counter()
            store = LmdbStore(os.path.join(tmp, "s"), budget_bytes=budget)
            again = TmemHost(budget_bytes=budget, log=store)
            assert again.restore(store.load()) == []
            t_reopen = min(t_reopen, time.perf_counter() - t0)
            assert again.store_stats().persistent_pages == n
            store.close()
        durable_n = min(n, 20_000)  # fsync per commit: keep the run short
        t_durable, _, dstore = fill(os.path.join(disk, "s"), True, durable_n)
        dstore.close()
        t_single, _, sstore = fill(os.path.join(tmp, "u"), False, durable_n, batched=False)
        sstore.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    return {
        "persistent_put_pages_per_s": round(n / best),
        "persistent_get_pages_per_s": round(n / t_get),
        "reopen_seconds_per_million_pages": round(t_reopen * 1e6 / n, 3),
        "durable_put_pages_per_s": round(durable_n / t_durable),
        "durable_pages": durable_n,
        "persistent_put_unbatched_pages_per_s": round(durable_n / t_single),
        "store_file_bytes_per_page": round(file_bytes / n, 1),
        "store_charged_bytes_per_page": round(used / n, 1),
    }


def run(
    n_pages: int,
    batch: int,
    runs: int,
    guest_ram: str | None = None,
    store_dir: str = "/dev/shm",
    durable_dir: str = "/var/tmp",
) -> dict[str, object]:
    mix: dict[str, object] = {"zero": 0.35, "duplicate": 0.20, "compressible": 0.35, "random": 0.10}
    if guest_ram:
        pages, mix = guest_ram_pages(guest_ram)
        n_pages = len(pages)
    else:
        pages = make_mix(n_pages)
    handles = [((i // 64, 7, 9), i % 64) for i in range(n_pages)]

    def fresh() -> tuple[TmemHost, int]:
        host = TmemHost(budget_bytes=1 << 40)
        host.add_client("bench", dedup=True)
        return host, host.new_pool("bench", PoolFlag.PERSISTENT)

    holder: dict[str, TmemHost] = {}

    def timed_put(batched: bool) -> float:
        """One put pass into a fresh host; creating and freeing hosts is not timed
        (freeing a 100k-page store costs as much as filling it with lz4 off)."""
        holder.clear()
        gc.collect()
        host, pool = fresh()
        t0 = time.perf_counter()
        if batched:
            for i in range(0, n_pages, batch):
                host.put_batch("bench", pool, handles[i : i + batch], pages[i : i + batch])
        else:
            for (oid, index), page in zip(handles, pages, strict=True):
                host.put("bench", pool, oid, index, page)
        elapsed = time.perf_counter() - t0
        holder["h"] = host
        return elapsed

    t_put1 = min(timed_put(False) for _ in range(runs))
    t_put = min(timed_put(True) for _ in range(runs))
    host = holder["h"]
    pool = 0

    def get_batched() -> None:
        for i in range(0, n_pages, batch):
            got = host.get_batch("bench", pool, handles[i : i + batch])
            assert got[0] == pages[i]

    def get_single() -> None:
        for oid, index in handles:
            host.get("bench", pool, oid, index)

    t_get = best_of(runs, get_batched)
    t_get1 = best_of(runs, get_single)
    compressed = [lz4.block.compress(p, store_size=False) for p in pages]
    t_lz4c = best_of(runs, lambda: [lz4.block.compress(p, store_size=False) for p in pages])
    t_lz4d = best_of(
        runs, lambda: [lz4.block.decompress(c, uncompressed_size=PAGE_SIZE) for c in compressed]
    )
    stats = host.store_stats()
    assert host.audit() == []
    holder.clear()  # the persistent runs below get the memory
    gc.collect()
    durable = persistent(pages, handles, batch, runs, store_dir, durable_dir)
    persistent_put = int(str(durable["persistent_put_pages_per_s"]))
    return {
        "pages": n_pages,
        "batch": batch,
        "mix": mix,
        "put_pages_per_s": round(n_pages / t_put),
        "get_pages_per_s": round(n_pages / t_get),
        "put_unbatched_pages_per_s": round(n_pages / t_put1),
        "get_unbatched_pages_per_s": round(n_pages / t_get1),
        "lz4_compress_pages_per_s": round(n_pages / t_lz4c),
        "lz4_decompress_pages_per_s": round(n_pages / t_lz4d),
        "put_vs_lz4_ratio": round(t_lz4c / t_put, 3),
        "get_vs_lz4_ratio": round(t_lz4d / t_get, 3),
        "metadata_bytes_per_page": round(stats.metadata_bytes / stats.pages, 1),
        "charged_bytes_per_page": round(stats.used_bytes / stats.pages, 1),
        "stored_fraction": round(stats.used_bytes / (stats.pages * PAGE_SIZE), 4),
        "unique_blobs": stats.unique_blobs,
        "zero_pages": stats.zero_pages,
        "dedup_hits": stats.dedup_hits,
        **durable,
        "persistent_vs_memory_put_ratio": round(persistent_put * t_put / n_pages, 3),
        "cpu": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--guest-ram",
        nargs="?",
        const="all",
        choices=["all", "present"],
        help="use the pages of a real booted guest instead of the synthetic mix: "
        "all of its RAM (default) or the pages it touched (root, QEMU)",
    )
    ap.add_argument(
        "--store-dir",
        default="/dev/shm",
        help="where the persistent store is measured (tmpfs, as memd serve runs)",
    )
    ap.add_argument(
        "--durable-dir",
        default="/var/tmp",
        help="a directory on disk for the --durable measurement",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    result = run(
        args.pages,
        args.batch,
        args.runs,
        guest_ram=args.guest_ram,
        store_dir=args.store_dir,
        durable_dir=args.durable_dir,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
