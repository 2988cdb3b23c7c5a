"""memd's NBD swap disk against nbdkit's memory plugin (allocator=zstd), same client.

Both servers run as their own processes on unix sockets, in the same run:

* memd — ``memd serve --swap bench=SOCK:SIZE`` (tmem: lz4 + de-duplication);
* nbdkit — ``nbdkit memory SIZE allocator=zstd`` (zstd-compressed sparse array).

The client is libnbd's Python binding (Debian's python3-libnbd, so it runs under
``/usr/bin/python3``), one connection, queue depth 32: 4 KiB writes of the tmem_bench
page mix (35% zero · 20% duplicates · 35% text · 10% random) to every page of the
export in a random order, then 4 KiB reads in another random order, each read checked
against what was written.  The client costs the same against both servers, so the
ratios compare the servers; on a 2-core host the client and the server share the
cores, so absolute figures understate both.

Host bytes per page: the server process's resident set after the writes minus before,
divided by the pages written (both servers measured the same way); for memd also the
store's own accounting (``memd_store_bytes_per_page``: data + metadata as tmem charges
its budget).  ``memd_4guest_write_iops``: four guests' disks on one memd, four clients
writing at once (sum).  ``memd_spill_*``: the cost of the spill tier — the same writes and
reads with a budget that holds a tenth of the data, so most pages go to the spill file
and come back from it (``memd_spilled_fraction``: spilled pages after the writes).

A second client, for comparison with the figures in /work/shared/design.md: ``qemu-img
bench -d 32 -s 4k`` (QEMU's block layer, sequential offsets, one constant byte pattern —
not the page mix), keys ``qemu_img_const_*``.

``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tmem_bench import make_mix

PAGE = 4096
SYSTEM_PYTHON = "/usr/bin/python3"

#: Runs under /usr/bin/python3 (python3-libnbd): argv = uri, mix file, seed, qd, mode.
CLIENT = r"""
import json, random, sys, time
import nbd
uri, mix, seed, qd, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
data = open(mix, "rb").read()
n = len(data) // 4096
pages = [data[i * 4096:(i + 1) * 4096] for i in range(n)]
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() >= n * 4096
rng = random.Random(seed)
order = list(range(n))

def run(submit):
    rng.shuffle(order)
    done = [0]
    def completed(err, _done=done):
        _done[0] += 1
        return 1                              # retire the command
    t0 = time.perf_counter()
    i = 0
    while i < n:
        while i < n and h.aio_in_flight() < qd:
            submit(order[i], completed)
            i += 1
        h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    elapsed = time.perf_counter() - t0
    assert done[0] == n
    return n / elapsed

out = {}
if "w" in mode:
    bufs = [nbd.Buffer.from_bytearray(bytearray(p)) for p in pages]
    out["write_iops"] = run(lambda k, cb: h.aio_pwrite(bufs[k], k * 4096,
                                                        completion=cb))
    h.flush()
if "r" in mode:
    rbufs = [nbd.Buffer(4096) for _ in range(n)]
    out["read_iops"] = run(lambda k, cb: h.aio_pread(rbufs[k], k * 4096, completion=cb))
    bad = sum(1 for k in range(n) if rbufs[k].to_bytearray() != pages[k])
    out["read_mismatches"] = bad
h.shutdown()
print(json.dumps(out))
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _wait_socket(proc: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.args!r}")
        time.sleep(0.05)


def _client(
    script: Path, uri: str, mix: Path, seed: int, qd: int, mode: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, str(script), uri, str(mix), str(seed), str(qd), mode],
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode})")
    result: dict[str, float] = json.loads(out)
    return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _memd(
    tmp: Path, disks: list[str], size: int, budget: str = "4G"
) -> tuple[subprocess.Popen[bytes], list[Path]]:
    socks = [tmp / f"{d}.nbd" for d in disks]
    cmd = [
        sys.executable,
        "-m",
        "memd.cli",
        "--socket",
        str(tmp / "control.sock"),
        "serve",
        "--store",
        str(tmp / "store"),
        "--budget",
        budget,
        "--guest-cap",
        "4G",
        "--log-level",
        "warning",
        "--spill-dir",
        str(tmp / "spill"),
    ]
    for d, s in zip(disks, socks, strict=True):
        cmd += ["--swap", f"{d}={s}:{size}"]
    env = {
        **os.environ,
        "MEMD_RUN_DIR": str(tmp),
        "MEMD_STATE_DIR": str(tmp),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    proc = subprocess.Popen(cmd, env=env, cwd=tmp)
    for s in socks:
        _wait_socket(proc, s)
    return proc, socks


def _memd_cli(tmp: Path, command: str) -> Any:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(tmp / "control.sock"),
            command,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return json.loads(out.stdout)


def _memd_store_bytes(tmp: Path) -> int:
    return int(_memd_cli(tmp, "status")["tmem"]["used_bytes"])


def _qemu_img_bench(sock: Path, pages: int, write: bool) -> float:
    cmd = ["qemu-img", "bench", "-f", "raw", "-d", "32", "-s", "4k", "-c", str(pages)]
    if write:
        cmd += ["-w", "--pattern=0x41"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, f"nbd+unix:///?socket={sock}"], check=True, capture_output=True)
    return pages / (time.perf_counter() - t0)


def _measure(
    server: subprocess.Popen[bytes],
    script: Path,
    sock: Path,
    mix: Path,
    pages: int,
    qd: int,
    store: Callable[[], int] | None = None,
) -> dict[str, float]:
    uri = f"nbd+unix:///?socket={sock}"
    before = _rss(server.pid)
    result = _finish(_client(script, uri, mix, 1, qd, "w"))
    result["bytes_per_page"] = (_rss(server.pid) - before) / pages
    if store is not None:
        result["store_bytes_per_page"] = store() / pages
    result.update({k: v for k, v in _finish(_client(script, uri, mix, 2, qd, "r")).items()})
    if shutil.which("qemu-img"):
        result["qemu_img_write_iops"] = _qemu_img_bench(sock, pages, True)
        result["qemu_img_read_iops"] = _qemu_img_bench(sock, pages, False)
    return result


def run(pages: int, qd: int) -> dict[str, object]:
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("nbdkit") is None:
        raise SystemExit("needs nbdkit and python3-libnbd (scripts/setup.sh --all)")
    size = pages * PAGE
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as td:
        tmp = Path(td)
        script = tmp / "client.py"
        script.write_text(CLIENT)
        mix = tmp / "mix.raw"
        mix.write_bytes(b"".join(make_mix(pages, seed=3)))

        (tmp / "m1").mkdir()
        memd, (sock,) = _memd(tmp / "m1", ["bench"], size)
        try:
            m = _measure(
                memd, script, sock, mix, pages, qd, store=lambda: _memd_store_bytes(tmp / "m1")
            )
        finally:
            _stop(memd)

        nsock = tmp / "nbdkit.sock"
        nbdkit = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "-U",
                str(nsock),
                "--exit-with-parent",
                "memory",
                f"size={size}",
                "allocator=zstd",
            ]
        )
        try:
            _wait_socket(nbdkit, nsock)
            k = _measure(nbdkit, script, nsock, mix, pages, qd)
        finally:
            _stop(nbdkit)

        (tmp / "m4").mkdir()
        memd4, socks = _memd(tmp / "m4", [f"g{i}" for i in range(4)], size // 4)
        quarter = tmp / "mix4.raw"
        quarter.write_bytes(mix.read_bytes()[: (pages // 4) * PAGE])
        try:
            clients = [
                _client(script, f"nbd+unix:///?socket={s}", quarter, 10 + i, qd, "w")
                for i, s in enumerate(socks)
            ]
            t0 = time.perf_counter()
            for c in clients:
                _finish(c)
            four = 4 * (pages // 4) / (time.perf_counter() - t0)
        finally:
            _stop(memd4)

        # The cost of the spill tier: the same run with a budget that holds a tenth of it.
        (tmp / "ms").mkdir()
        budget = max(4 << 20, int(m["store_bytes_per_page"] * pages) // 10)
        memds, (ssock,) = _memd(tmp / "ms", ["bench"], size, budget=str(budget))
        try:
            uri = f"nbd+unix:///?socket={ssock}"
            sp = _finish(_client(script, uri, mix, 1, qd, "w"))
            spilled = int(_memd_cli(tmp / "ms", "guests")[0]["swap"]["spilled_pages"])
            sp.update(_finish(_client(script, uri, mix, 2, qd, "r")))
        finally:
            _stop(memds)

    return {
        "pages": pages,
        "queue_depth": qd,
        "cpu": os.cpu_count(),
        "memd_write_iops": round(m["write_iops"]),
        "memd_read_iops": round(m["read_iops"]),
        "nbdkit_write_iops": round(k["write_iops"]),
        "nbdkit_read_iops": round(k["read_iops"]),
        "write_ratio": round(m["write_iops"] / k["write_iops"], 3),
        "read_ratio": round(m["read_iops"] / k["read_iops"], 3),
        "memd_host_bytes_per_page": round(m["bytes_per_page"], 1),
        "nbdkit_host_bytes_per_page": round(k["bytes_per_page"], 1),
        "memd_store_bytes_per_page": round(m["store_bytes_per_page"], 1),
        "memd_4guest_write_iops": round(four),
        "memd_spill_write_iops": round(sp["write_iops"]),
        "memd_spill_read_iops": round(sp["read_iops"]),
        "memd_spill_budget_bytes": budget,
        "memd_spilled_fraction": round(spilled / pages, 3),
        "read_mismatches": int(m["read_mismatches"] + k["read_mismatches"] + sp["read_mismatches"]),
        **{
            f"qemu_img_const_{who}_{rw}_iops": round(r[f"qemu_img_{rw}_iops"])
            for who, r in (("memd", m), ("nbdkit", k))
            for rw in ("write", "read")
            if f"qemu_img_{rw}_iops" in r
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=100_000, help="4 KiB pages written and read")
    ap.add_argument("--qd", type=int, default=32, help="requests in flight")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    result = run(args.pages, args.qd)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
