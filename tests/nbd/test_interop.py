"""memd's NBD server against independent clients: QEMU's block layer (qemu-img,
qemu-io) and libnbd (nbdinfo, nbdcopy, and its Python binding, run by Debian's
/usr/bin/python3 where python3-libnbd installs it), plus `memd serve --swap` as a
process: its table, and a graceful restart that keeps the disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.tmem_bench import make_mix
from tests.nbd.conftest import (
    SYSTEM_PYTHON,
    SwapAgent,
    accepts,
    have_libnbd_python,
    nbd_uri,
    need,
    run,
)

PAGE = 4096


def mix_file(path: Path, pages: int) -> bytes:
    data = b"".join(make_mix(pages, seed=7))
    path.write_bytes(data)
    return data


def test_qemu_img_convert_compare_and_back(swap_agent: SwapAgent, tmp_path: Path) -> None:
    need("qemu-img")
    src = tmp_path / "src.raw"
    data = mix_file(src, 2048)  # 8 MiB of the tmem_bench page mix
    uri = nbd_uri(swap_agent.add_disk("vm1", 16 << 20))
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 16 << 20
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    # compare reads the whole export: the first 8 MiB as written, the rest zeros
    padded = tmp_path / "padded.raw"
    padded.write_bytes(data + bytes((16 << 20) - len(data)))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(padded), uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back))
    assert back.read_bytes() == padded.read_bytes()
    stats = swap_agent.app.swap.disks["vm1"].describe()
    # qemu-img skips zero pages (write-zeroes / sparse): what is stored is the non-zero mix
    nonzero = sum(1 for i in range(0, len(data), PAGE) if any(data[i : i + PAGE]))
    assert 0 < stats["pages"] <= 2048 and stats["pages"] >= nonzero
    assert stats["ratio"] > 1.5  # lz4 + dedup of the text and duplicate pages
    assert swap_agent.app.tmem.audit() == []


def test_qemu_io_patterns_discard_zeroes_and_pipelined_aio(swap_agent: SwapAgent) -> None:
    need("qemu-io")
    uri = nbd_uri(swap_agent.add_disk("vm1", 8 << 20))
    cmds = (
        [
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "read -P 0 1M 1M",  # never written: zeros
            "write -P 0x11 100 3000",
            "read -P 0x11 100 3000",
            "read -P 0xab 0 100",
            "read -P 0xab 3100 1000",  # the rest of the read-modify-written page
            "write -P 0x22 8190 8200",
            "read -P 0x22 8190 8200",  # spans three pages
            "discard 64k 64k",
            "read -P 0 64k 64k",
            "write -z 200k 10000",
            "read -P 0 200k 10000",
            "read -P 0xab 190k 10k",
            "write -z -u 512k 64k",
            "read -P 0 512k 64k",  # may unmap: memd flushes
            "write -f -P 0x33 2M 4k",  # FUA
            "flush",
        ]
        + [f"aio_write -P {i + 1} {i * 4}k 4k" for i in range(64)]
        + ["aio_flush"]
        + [f"read -P {i + 1} {i * 4}k 4k" for i in range(0, 64, 7)]
    )
    args = [a for c in cmds for a in ("-c", c)]
    out = run("qemu-io", "-f", "raw", *args, uri).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower()
    assert out.count("read ") >= 10
    assert swap_agent.app.swap.disks["vm1"].describe()["errors"] == 0


def test_nbdinfo_and_nbdcopy(swap_agent: SwapAgent, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy")
    uri = nbd_uri(swap_agent.add_disk("vm2", 4 << 20))
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    export = info["exports"][0]
    assert export["export-size"] == 4 << 20 and export["can_trim"] and export["can_zero"]
    assert export["block_size_maximum"] == 32 << 20
    listed = run("nbdinfo", "--list", "--json", uri).stdout
    assert json.loads(listed)["exports"][0]["export-name"] == "vm2"
    src = tmp_path / "src.raw"
    data = mix_file(src, 1024)
    run("nbdcopy", "--requests=32", str(src), uri)  # many requests in flight
    dst = tmp_path / "dst.raw"
    run("nbdcopy", uri, str(dst))
    assert dst.read_bytes() == data


_LIBNBD_SCRIPT = r"""
import os, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_multi_conn()
pages = [os.urandom(2048) + bytes(2048) for _ in range(256)]
cookies = []
for i, p in enumerate(pages):                     # 256 writes, up to 32 in flight
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    cookies.append(h.aio_pwrite(p, i * 4096 * 3))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for i, p in enumerate(pages):
    assert h.pread(4096, i * 4096 * 3) == p
h.trim(4096 * 3, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(10, 4096 * 3 + 5)
assert h.pread(10, 4096 * 3 + 5) == bytes(10)
h.flush()
try:
    h.pread(4096, size)
except nbd.Error as e:
    print("past-end", e.errno)
print("ok")
h.shutdown()
"""


def test_libnbd_python_binding_pipelined(swap_agent: SwapAgent) -> None:
    if not have_libnbd_python():
        pytest.skip("python3-libnbd is not installed for /usr/bin/python3")
    uri = nbd_uri(swap_agent.add_disk("vm3", 8 << 20))
    out = run(SYSTEM_PYTHON, "-c", _LIBNBD_SCRIPT, uri).stdout.split()
    assert out[-1] == "ok"
    assert swap_agent.app.swap.disks["vm3"].describe()["pages"] == 255


def _serve(
    tmp: Path, control: Path, disk: Path, store: Path | str, *extra: str, size: str = "16M"
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memd.cli",
            "--socket",
            str(control),
            "serve",
            "--store",
            str(store),
            "--budget",
            "64M",
            "--swap",
            f"vm1={disk}:{size}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MEMD_RUN_DIR": str(tmp)},
    )
    deadline = time.monotonic() + 30
    while not (control.exists() and accepts(disk)):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_serve_swap_flag_cli_tables_and_graceful_restart(tmp_path: Path) -> None:
    need("qemu-io")
    control, disk, state = tmp_path / "c.sock", tmp_path / "vm1.nbd", tmp_path / "store"
    proc = _serve(tmp_path, control, disk, state)
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x6d 0 2M", nbd_uri(str(disk)))
        cli = [sys.executable, "-m", "memd.cli", "--socket", str(control)]
        rows = json.loads(run(*cli, "guests", "--json").stdout)
        swap = rows[0]["swap"]
        assert (rows[0]["name"], swap["size"], swap["pages"]) == ("vm1", 16 << 20, 512)
        assert swap["bytes_stored"] < 64 * 512 and swap["ratio"] > 50
        human = run(*cli, "stats").stdout
        assert "swap disks (NBD)" in human and "16M" in human
        assert "vm1" in run(*cli, "guests").stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert state.is_dir() and not disk.exists()
    proc = _serve(tmp_path, control, disk, state)  # the store brings the disk back
    try:
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x6d 0 2M",
            "-c",
            "read -P 0 2M 1M",
            nbd_uri(str(disk)),
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_kill_9_then_restart_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """With the store (the default), an acknowledged NBD write survives kill -9."""
    need("qemu-io")
    control, disk, store = tmp_path / "c.sock", tmp_path / "vm1.nbd", tmp_path / "store"
    proc = _serve(tmp_path, control, disk, store)
    try:
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x6d 0 1M",
            "-c",
            "write -P 0x3c 3M 4k",
            nbd_uri(str(disk)),
        )
    finally:
        proc.kill()
        proc.wait()
    proc = _serve(tmp_path, control, disk, store)
    try:
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x6d 0 1M",
            "-c",
            "read -P 0x3c 3M 4k",
            "-c",
            "read -P 0 1M 2M",
            nbd_uri(str(disk)),
        )
        cli = [sys.executable, "-m", "memd.cli", "--socket", str(control)]
        swap = json.loads(run(*cli, "guests", "--json").stdout)[0]["swap"]
        assert swap["lost_pages"] == 0 and swap["pages"] == 257
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_kill_9_without_a_store_answers_eio_not_zeros(tmp_path: Path) -> None:
    """`--store ''`: pages held in memory die with the agent; the restarted agent knows
    its disk was served before (a marker in the run directory) and answers reads of those
    pages with EIO, until they are written or discarded."""
    need("qemu-io")
    control, disk, state = tmp_path / "c.sock", tmp_path / "vm1.nbd", ""
    proc = _serve(tmp_path, control, disk, state)
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x6d 0 1M", nbd_uri(str(disk)))
    finally:
        proc.kill()
        proc.wait()
    proc = _serve(tmp_path, control, disk, state)
    try:
        uri = nbd_uri(str(disk))
        result = run("qemu-io", "-f", "raw", "-c", "read -P 0x6d 0 4k", uri, check=False)
        assert "Input/output error" in result.stdout + result.stderr
        run("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 4k", "-c", "read -P 0x21 0 4k", uri)
        cli = [sys.executable, "-m", "memd.cli", "--socket", str(control)]
        swap = json.loads(run(*cli, "guests", "--json").stdout)[0]["swap"]
        assert swap["lost_pages"] == 4096 - 1
        run("qemu-io", "-f", "raw", "-c", "discard 0 16M", "-c", "read -P 0 4k 1M", uri)
        swap = json.loads(run(*cli, "guests", "--json").stdout)[0]["swap"]
        assert swap["lost_pages"] == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_spill_beyond_the_budget_and_across_a_graceful_restart(tmp_path: Path) -> None:
    """`serve --budget 8M` and 24 MiB of incompressible data: the coldest pages go to the
    spill file, everything reads back; after SIGTERM + restart (store + spill map) the
    disk still compares equal; after kill -9 (no spill map) the spilled pages read as
    lost (EIO), never as zeros, and the pages the store holds read back."""
    need("qemu-img")
    control, disk, state = tmp_path / "c.sock", tmp_path / "vm1.nbd", tmp_path / "store"
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(24 << 20) + bytes(8 << 20))

    def serve() -> subprocess.Popen[str]:  # the same agent each time: budget, spill dir, disk
        return _serve(
            tmp_path,
            control,
            disk,
            state,
            "--budget",
            "8M",
            "--spill-dir",
            str(tmp_path / "spill"),
            size="32M",
        )

    proc = serve()
    uri = nbd_uri(str(disk))
    cli = [sys.executable, "-m", "memd.cli", "--socket", str(control)]
    try:
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
        swap = json.loads(run(*cli, "guests", "--json").stdout)[0]["swap"]
        assert swap["spilled_pages"] > 3000 and swap["errors"] == 0
        assert "SPILLED" in run(*cli, "stats").stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    proc = serve()
    try:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    finally:
        proc.kill()  # a crash: the spill map is not written
        proc.wait()
    proc = serve()
    try:
        swap = json.loads(run(*cli, "guests", "--json").stdout)[0]["swap"]
        assert swap["lost_pages"] > 3000 and swap["pages"] + swap["lost_pages"] == 8192
        result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, check=False)
        assert result.returncode != 0 and "Input/output error" in result.stdout + result.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_attach_swap_with_path_and_status_line(tmp_path: Path) -> None:
    """`memd attach VM --swap SIZE --path SOCK` (a plain QEMU's disk at run time), `memd
    status` names it, `memd detach VM --swap` stops serving it."""
    need("qemu-io")
    control, disk, state = tmp_path / "c.sock", tmp_path / "vm1.nbd", tmp_path / "tmem.snap"
    proc = _serve(tmp_path, control, disk, state)
    cli = [sys.executable, "-m", "memd.cli", "--socket", str(control)]
    try:
        extra = tmp_path / "vm2.nbd"
        out = run(*cli, "attach", "vm2", "--swap", "8M", "--path", str(extra)).stdout
        assert f"vm2: swap disk of 8M on {extra}" in out
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 8M",
            "-c",
            "read -P 0x77 0 8M",
            nbd_uri(str(extra)),
        )
        status = run(*cli, "status").stdout
        assert "2 NBD swap disks" in status and "vm2 8M (2048 pages in memory" in status
        bad = run(*cli, "attach", "vm2", "--swap", "8M", "--path", str(extra), check=False)
        assert bad.returncode == 1 and "already has a swap disk" in bad.stderr
        assert "vm2: swap disk detached" in run(*cli, "detach", "vm2", "--swap").stdout
        assert not extra.exists()
        assert "1 NBD swap disks" in run(*cli, "status").stdout
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
