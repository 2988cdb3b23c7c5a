"""Guest → host agent → tmem throughput over real unix sockets, beside tmem called in-process.

The question (issue 11): what does the protocol path — codec, socket, event loop,
dispatch — cost over calling ``TmemHost`` directly?  So the headline ratios compare like
with like: the agent runs as deployed, its persistent pages written through its LMDB
store (``memd serve --store``, committed before each reply), and the in-process ceiling
has the same store behind it (``LmdbStore``, not durable, as the agent's default),
committed after every call.  What the store itself costs is a separate, deliberate cost,
measured by ``tmem_bench`` (``persistent_vs_memory_put_ratio``); it is shown here too,
not hidden: the ``*_vs_no_store`` ratios and ``inprocess_no_store_*`` figures put the
agent with its store beside a ceiling without one.

What one run measures, on the page mix of ``tmem_bench.make_mix`` (35% zero, 20%
duplicates, 35% text-like, 10% random) with the same handles and batch size:

* **in-process**: ``TmemHost.put_batch/get_batch`` (and ``put/get``) called directly —
  the ceiling: no codec, no socket, no event loop; with the agent's kind of store
  (``inprocess_*``) and without any (``inprocess_no_store_*``);
* **socket, agent in a separate process** (``memd serve --listen NAME=PATH --store``, as
  it is deployed): one guest (``GuestClient`` in this process) batched — PUT_BATCH/
  GET_BATCH frames of ``--batch`` pages, pipelined (32 in flight) — and unbatched (one
  PUT/GET per page, one round trip each); then 8 guests at once, each a separate
  process with its own channel, aggregate pages/s;
* **socket, agent in this process** (asyncio loop in a background thread, as the tests
  and ``memd demo`` run it, with a store too): one guest batched, for comparison —
  client and agent then share one GIL.

``batched_put_ratio`` = separate-process batched socket put ÷ in-process batched put,
both with a store (``batched_get_ratio``, the unbatched and the many-guest ratios
likewise); ``batched_put_ratio_vs_no_store`` = the same socket put ÷ in-process put
without a store (the protocol path and the store together).  Every put run uses a fresh
pool, destroyed afterwards, on both sides, so no run overwrites the previous run's
pages.  The guest consents to dedup (as ``tmem_bench`` enables it).  The 8-guest
figures on a 2-core machine measure contention more than scaling: the agent is one
thread.  Wall-clock ratios suffer when other work shares the cores (``loadavg_1min`` is
recorded, and the guest client in this process needs a core too); ``agent_cpu_us_per_page_*``
beside ``inprocess_cpu_us_per_page_*`` (both including the untimed pool destroy/create
between runs, both with a store) is the load-insensitive view of the agent's cost, and
``batched_*_cpu_ratio`` their quotient (in-process ÷ agent).

``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tmem_bench import make_mix
from memd import wire
from memd.guest.client import GuestClient
from tmem.host import TmemHost
from tmem.types import PoolFlag

T = TypeVar("T")

BUDGET = 1 << 40  # never the limit: this measures the path, not eviction
CAPABILITIES = wire.ALL_CAPABILITIES | int(wire.Capability.DEDUP_OPT_IN)
IN_FLIGHT = 32
Handle = tuple[tuple[int, int, int], int]


def handles_for(n: int) -> list[Handle]:
    return [((i // 64, 7, 9), i % 64) for i in range(n)]


def best_of(
    runs: int, fn: Callable[[], object], setup: Callable[[], object] | None = None
) -> float:
    """Fastest of ``runs`` timed calls of ``fn``; ``setup`` runs untimed before each."""
    best = float("inf")
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --- in-process baseline -------------------------------------------------------------


@contextmanager
def tmem_host(store_dir: str | None) -> Iterator[TmemHost]:
    """A TmemHost for the in-process runs: with an LMDB store in ``store_dir`` as
    ``memd serve --store`` has (not durable: the agent's default), or none (None)."""
    if store_dir is None:
        yield TmemHost(budget_bytes=BUDGET)
        return
    from hypervisor.lmdb_store import LmdbStore

    store = LmdbStore(store_dir, budget_bytes=BUDGET)
    try:
        yield TmemHost(budget_bytes=BUDGET, log=store)
    finally:
        store.close()


def in_process(
    pages: list[bytes], batch: int, runs: int, unbatched: int, store_dir: str | None
) -> dict[str, float]:
    """Seconds for each operation, TmemHost called directly (with a store in
    ``store_dir``, committed after every call as the agent commits after every read)."""
    with tmem_host(store_dir) as host:
        return _in_process(host, pages, batch, runs, unbatched)


def _in_process(
    host: TmemHost, pages: list[bytes], batch: int, runs: int, unbatched: int
) -> dict[str, float]:
    n = len(pages)
    handles = handles_for(n)
    host.add_client("bench", dedup=True)
    pools: list[int] = []

    def fresh_pool() -> None:
        if pools:
            host.destroy_pool("bench", pools.pop())
        pools.append(host.new_pool("bench", PoolFlag.PERSISTENT))

    def put_batched() -> None:
        pool = pools[0]
        for i in range(0, n, batch):
            results = host.put_batch("bench", pool, handles[i : i + batch], pages[i : i + batch])
            assert not any(results)

    def get_batched() -> None:
        pool = pools[0]
        for i in range(0, n, batch):
            got = host.get_batch("bench", pool, handles[i : i + batch])
            assert got[0] == pages[i]

    def put_single() -> None:
        pool = pools[1]
        for (oid, index), page in zip(handles[:unbatched], pages[:unbatched], strict=True):
            host.put("bench", pool, oid, index, page)

    def fresh_single_pool() -> None:
        if len(pools) > 1:
            host.destroy_pool("bench", pools.pop())
        pools.append(host.new_pool("bench", PoolFlag.PERSISTENT))

    def get_single() -> None:
        for oid, index in handles[:unbatched]:
            host.get("bench", pools[0], oid, index)

    cpu0 = time.process_time()
    put = best_of(runs, put_batched, fresh_pool)
    cpu1 = time.process_time()
    get = best_of(runs, get_batched)
    cpu2 = time.process_time()
    return {
        "put": put,
        "get": get,
        "cpu_put": (cpu1 - cpu0) / (runs * n),
        "cpu_get": (cpu2 - cpu1) / (runs * n),
        "put1": best_of(runs, put_single, fresh_single_pool),
        "get1": best_of(runs, get_single),
    }


# --- one guest over a socket ---------------------------------------------------------


def connect(path: str) -> GuestClient:
    client = GuestClient.for_unix_socket(
        path,
        boot_id=os.urandom(16),
        timeout=30.0,
        reconnect_timeout=10.0,
        capabilities=CAPABILITIES,
        max_in_flight=IN_FLIGHT,
    )
    client.connect()
    return client


def socket_put_batched(
    client: GuestClient, pool: int, handles: Sequence[Handle], pages: Sequence[bytes], batch: int
) -> None:
    requests: list[wire.Request] = [
        wire.PutBatchRequest(pool, handles[i : i + batch], pages[i : i + batch])
        for i in range(0, len(pages), batch)
    ]
    for reply in client.pipeline(requests):
        if not isinstance(reply, wire.PutBatchReply) or any(reply.statuses):
            raise RuntimeError(f"PUT_BATCH failed: {reply}")


def socket_get_batched(
    client: GuestClient, pool: int, handles: Sequence[Handle], batch: int
) -> list[bytes]:
    requests: list[wire.Request] = [
        wire.GetBatchRequest(pool, handles[i : i + batch]) for i in range(0, len(handles), batch)
    ]
    out: list[bytes] = []
    for reply in client.pipeline(requests):
        if not isinstance(reply, wire.GetBatchReply) or any(reply.statuses):
            raise RuntimeError(f"GET_BATCH failed: {reply}")
        out.extend(bytes(p) for p in reply.pages if p is not None)
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_guest(
    path: str,
    pages: list[bytes],
    batch: int,
    runs: int,
    unbatched: int,
    agent_pid: int | None = None,
) -> dict[str, float]:
    """Seconds for each operation through the agent at ``path`` (unbatched: 0 to skip);
    with ``agent_pid``, also the agent's CPU seconds per batched put/get page."""
    n = len(pages)
    handles = handles_for(n)
    client = connect(path)
    pools: list[int] = []

    def fresh_pool() -> None:
        if pools:
            client.destroy_pool(pools.pop())
        pools.append(client.new_pool(persistent=True))

    def put_batched() -> None:
        socket_put_batched(client, pools[0], handles, pages, batch)

    def get_batched() -> None:
        got = socket_get_batched(client, pools[0], handles, batch)
        assert got[0] == pages[0] and len(got) == n

    cpu0 = process_cpu(agent_pid) if agent_pid else 0.0
    out = {"put": best_of(runs, put_batched, fresh_pool)}
    cpu1 = process_cpu(agent_pid) if agent_pid else 0.0
    out["get"] = best_of(runs, get_batched)
    if agent_pid:
        out["cpu_put"] = (cpu1 - cpu0) / (runs * n)  # includes the untimed destroy/new pool
        out["cpu_get"] = (process_cpu(agent_pid) - cpu1) / (runs * n)
    if pages != socket_get_batched(client, pools[0], handles, batch):
        raise RuntimeError("pages came back different")
    if unbatched:

        def fresh_single_pool() -> None:
            if len(pools) > 1:
                client.destroy_pool(pools.pop())
            pools.append(client.new_pool(persistent=True))

        def put_single() -> None:
            pool = pools[1]
            for (oid, index), page in zip(handles[:unbatched], pages[:unbatched], strict=True):
                client.put(pool, oid, index, page)

        def get_single() -> None:
            for oid, index in handles[:unbatched]:
                client.get(pools[0], oid, index)

        out["put1"] = best_of(runs, put_single, fresh_single_pool)
        out["get1"] = best_of(runs, get_single)
    client.close()
    return out


# --- many guests, one process each -----------------------------------------------------


def _guest_proc(
    path: str, seed: int, n: int, batch: int, runs: int, barrier: Barrier, results: Any
) -> None:
    pages = make_mix(n, seed)
    handles = handles_for(n)
    client = connect(path)
    spans: dict[str, list[tuple[float, float]]] = {"put": [], "get": []}
    pool = -1
    for _ in range(runs):
        barrier.wait()
        if pool >= 0:
            client.destroy_pool(pool)
        pool = client.new_pool(persistent=True)
        barrier.wait()
        t0 = time.perf_counter()
        socket_put_batched(client, pool, handles, pages, batch)
        spans["put"].append((t0, time.perf_counter()))
    for _ in range(runs):
        barrier.wait()
        t0 = time.perf_counter()
        got = socket_get_batched(client, pool, handles, batch)
        spans["get"].append((t0, time.perf_counter()))
        if got != pages:
            raise RuntimeError(f"guest {seed}: pages came back different")
    client.close()
    results.put(spans)


def many_guests(paths: list[str], n: int, batch: int, runs: int) -> dict[str, float]:
    """Best wall-clock seconds (first start to last finish) for all guests' batched
    puts, and gets.  Guests are processes: their client work does not take the agent's
    GIL.  perf_counter is CLOCK_MONOTONIC, comparable across processes."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(paths))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_guest_proc, args=(p, 1 + g, n, batch, runs, barrier, results))
        for g, p in enumerate(paths)
    ]
    for proc in procs:
        proc.start()
    spans = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        if proc.exitcode != 0:
            raise RuntimeError(f"guest process exited with {proc.exitcode}")
    out = {}
    for op in ("put", "get"):
        out[op] = min(
            max(s[op][r][1] for s in spans) - min(s[op][r][0] for s in spans) for r in range(runs)
        )
    return out


# --- the agent --------------------------------------------------------------------------


@contextmanager
def agent_process(tmp: str, guests: int) -> Iterator[tuple[list[str], int]]:
    """`memd serve` in its own process, listening on one socket per guest → (paths, pid)."""
    paths = [os.path.join(tmp, f"g{i}.sock") for i in range(guests)]
    cmd = [
        sys.executable,
        "-m",
        "memd.cli",
        "--socket",
        os.path.join(tmp, "control.sock"),
        "serve",
        "--budget",
        str(BUDGET),
        "--log-level",
        "warning",
    ]
    for i, path in enumerate(paths):
        cmd += ["--listen", f"g{i}={path}"]
    # Every path the agent might use lives in tmp: a benchmark never touches a production
    # agent's state (/var/lib/memd) or run directory (/run/memd).  Its tmem store too: the
    # agent runs as deployed, persistent pages committed to the store before each reply.
    cmd += ["--store", os.path.join(tmp, "store")]
    env = {**os.environ, "MEMD_RUN_DIR": tmp, "MEMD_STATE_DIR": tmp}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not all(os.path.exists(p) for p in paths):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"memd serve did not start: {err.strip()}")
            time.sleep(0.05)
        yield paths, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _AgentLoop:
    """An asyncio loop in a daemon thread; ``run`` waits (60 s at most) for a coroutine on it.

    The benchmark's own copy: memd.demo's loop thread is private to the demo, and benchmarks
    never import the test tree (tests/support/loop_thread.py), so neither is borrowed.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="memd-agent", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@contextmanager
def agent_thread(tmp: str) -> Iterator[str]:
    """The agent on an asyncio loop in a background thread of this process, with a
    store as ``memd serve`` has."""
    from hypervisor.lmdb_store import LmdbStore
    from memd.agent.app import AgentApp

    store = LmdbStore(os.path.join(tmp, "thread-store"), budget_bytes=BUDGET)
    app = AgentApp(budget_bytes=BUDGET, store=store)
    loop = _AgentLoop()
    path = os.path.join(tmp, "thread.sock")
    try:
        loop.run(app.start(None))
        loop.run(app.agent.add_channel("bench", path, mode="listen"))
        yield path
    finally:
        loop.run(app.stop())
        loop.close()
        store.close()


# --- the run ------------------------------------------------------------------------------


def run(
    n_pages: int,
    batch: int,
    runs: int,
    unbatched: int,
    guests: int,
    guest_pages: int,
    thread_agent: bool,
) -> dict[str, object]:
    pages = make_mix(n_pages)
    rate = _rates
    with tempfile.TemporaryDirectory(prefix="memd-pbench-") as tmp:
        # The ceiling as the agent runs (its store behind tmem), and without any store.
        base = in_process(pages, batch, runs, unbatched, os.path.join(tmp, "inprocess-store"))
        bare = in_process(pages, batch, runs, unbatched, None)
        with agent_process(tmp, 1) as (paths, pid):
            one = one_guest(paths[0], pages, batch, runs, unbatched, pid)
        with agent_process(tmp, guests) as (paths, _):
            many = many_guests(paths, guest_pages, batch, runs)
        threaded = None
        if thread_agent:
            with agent_thread(tmp) as path:
                threaded = one_guest(path, pages, batch, runs, 0)
    result: dict[str, object] = {
        "pages": n_pages,
        "batch": batch,
        "in_flight": IN_FLIGHT,
        "unbatched_pages": unbatched,
        "mix": {"zero": 0.35, "duplicate": 0.20, "compressible": 0.35, "random": 0.10},
        "agent": "separate process (memd serve --listen --store), guests over unix sockets",
        "ceiling": "TmemHost in-process with an LMDB store as the agent's (no codec/socket)",
        "batched_put_ratio": round(base["put"] / one["put"], 3),
        "batched_get_ratio": round(base["get"] / one["get"], 3),
        "unbatched_put_ratio": round(base["put1"] / one["put1"], 3),
        "unbatched_get_ratio": round(base["get1"] / one["get1"], 3),
        # The agent with its store against a ceiling without one: protocol path + store.
        "batched_put_ratio_vs_no_store": round(bare["put"] / one["put"], 3),
        "batched_get_ratio_vs_no_store": round(bare["get"] / one["get"], 3),
        # CPU seconds per page, in-process ÷ agent: the load-insensitive form of the
        # batched ratios (the guest client's own CPU is not counted on either side).
        "batched_put_cpu_ratio": round(base["cpu_put"] / one["cpu_put"], 3),
        "batched_get_cpu_ratio": round(base["cpu_get"] / one["cpu_get"], 3),
        "agent_cpu_us_per_page_put": round(one["cpu_put"] * 1e6, 2),
        "agent_cpu_us_per_page_get": round(one["cpu_get"] * 1e6, 2),
        "inprocess_cpu_us_per_page_put": round(base["cpu_put"] * 1e6, 2),
        "inprocess_cpu_us_per_page_get": round(base["cpu_get"] * 1e6, 2),
        "inprocess_no_store_cpu_us_per_page_put": round(bare["cpu_put"] * 1e6, 2),
        "inprocess_no_store_cpu_us_per_page_get": round(bare["cpu_get"] * 1e6, 2),
        "inprocess_put_pages_per_s": rate(n_pages, base["put"]),
        "inprocess_get_pages_per_s": rate(n_pages, base["get"]),
        "inprocess_put_unbatched_pages_per_s": rate(unbatched, base["put1"]),
        "inprocess_get_unbatched_pages_per_s": rate(unbatched, base["get1"]),
        "inprocess_no_store_put_pages_per_s": rate(n_pages, bare["put"]),
        "inprocess_no_store_get_pages_per_s": rate(n_pages, bare["get"]),
        "socket_put_pages_per_s": rate(n_pages, one["put"]),
        "socket_get_pages_per_s": rate(n_pages, one["get"]),
        "socket_put_unbatched_pages_per_s": rate(unbatched, one["put1"]),
        "socket_get_unbatched_pages_per_s": rate(unbatched, one["get1"]),
        "guests": guests,
        "pages_per_guest": guest_pages,
        f"socket_{guests}guests_put_pages_per_s": rate(guests * guest_pages, many["put"]),
        f"socket_{guests}guests_get_pages_per_s": rate(guests * guest_pages, many["get"]),
        f"{guests}guests_put_ratio": round(
            rate(guests * guest_pages, many["put"]) / rate(n_pages, base["put"]), 3
        ),
        f"{guests}guests_get_ratio": round(
            rate(guests * guest_pages, many["get"]) / rate(n_pages, base["get"]), 3
        ),
    }
    if threaded is not None:
        result["thread_agent_put_pages_per_s"] = rate(n_pages, threaded["put"])
        result["thread_agent_get_pages_per_s"] = rate(n_pages, threaded["get"])
        result["thread_agent_batched_put_ratio"] = round(base["put"] / threaded["put"], 3)
        result["thread_agent_batched_get_ratio"] = round(base["get"] / threaded["get"], 3)
    result["cpu"] = os.cpu_count()
    result["loadavg_1min"] = round(os.getloadavg()[0], 2)
    result["note"] = (
        f"{os.cpu_count()} cores: agent, guest client(s) and bench share them;"
        " the agent is one asyncio thread"
    )
    return result


def _rates(n: int, seconds: float) -> int:
    return round(n / seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=20_000, help="pages, one guest (20000)")
    ap.add_argument("--batch", type=int, default=64, help="pages per batch (64)")
    ap.add_argument("--runs", type=int, default=3, help="best of N runs (3)")
    ap.add_argument(
        "--unbatched",
        type=int,
        default=4_000,
        help="pages for the one-page-per-request figures (4000)",
    )
    ap.add_argument("--guests", type=int, default=8, help="concurrent guests (8)")
    ap.add_argument("--guest-pages", type=int, default=5_000, help="pages per guest (5000)")
    ap.add_argument(
        "--no-thread-agent", action="store_true", help="skip the agent-in-a-thread comparison"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if not 1 <= args.batch <= wire.MAX_BATCH:
        ap.error(f"--batch must be 1..{wire.MAX_BATCH}")
    result = run(
        args.pages,
        args.batch,
        args.runs,
        args.unbatched,
        args.guests,
        args.guest_pages,
        not args.no_thread_agent,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
