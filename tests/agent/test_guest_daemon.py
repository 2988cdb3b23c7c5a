"""The guest daemon against a real agent on unix sockets: one session to the host, many local
programs through the daemon's socket, MEM_REPORT stored on the host and shown by the CLI."""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memd import wire
from memd.agent.commands import GuestsArgs, StatsArgs
from memd.agent.dispatch import Dispatcher, GuestState
from memd.guest.cli import daemon_client
from memd.guest.cli import main as guest_main
from memd.guest.daemon import GuestDaemon, LocalSession, memory_report, read_psi
from memd.wire import Capability, MemReportRequest, Op, Status
from tmem.host import TmemHost

from .conftest import RunningAgent


@pytest.fixture
def daemon(agent: RunningAgent, tmp_path: Path) -> Iterator[GuestDaemon]:
    port = agent.add_guest("g1")
    client = agent.client(port, capabilities=wire.ALL_CAPABILITIES | int(Capability.MEM_REPORT))
    report = MemReportRequest(262144, 200000, 1024, 512, 1234, 56, 0)
    d = GuestDaemon(
        client, str(tmp_path / "d.sock"), interval=0.2, log=io.StringIO(), report=lambda: report
    )
    d.start()
    try:
        yield d
    finally:
        d.close()


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_host_keeps_the_daemons_memory_report(agent: RunningAgent, daemon: GuestDaemon) -> None:
    guest = agent.app.agent.guests["g1"]
    _wait(lambda: guest.mem_reports >= 2)
    assert guest.memory == MemReportRequest(262144, 200000, 1024, 512, 1234, 56, 0)
    (row,) = agent.app.handlers.guests(GuestsArgs())
    assert row["memory"]["mem_available_kib"] == 200000
    assert row["memory"]["psi_some_avg10"] == 12.34 and row["memory"]["psi_full_avg10"] == 0.56
    stats = agent.app.handlers.stats(StatsArgs())
    assert stats["guest_memory"]["g1"]["swap_free_kib"] == 512


def test_two_local_programs_share_the_daemons_session(
    agent: RunningAgent, daemon: GuestDaemon
) -> None:
    errors: list[BaseException] = []

    def program(tag: int) -> None:
        try:
            client = daemon_client(daemon.path, timeout=5.0, reconnect_timeout=5.0)
            assert client is not None
            with client:
                pool = client.new_pool()
                for i in range(30):
                    page = bytes([tag, i]) * 2048
                    client.put(pool, tag, i, page)
                    assert client.get(pool, tag, i) == page  # ephemeral: get removes it
                statuses = client.put_batch(pool, [(tag, i, bytes([i]) * 4096) for i in range(200)])
                assert statuses == [Status.OK] * 200
                pages = client.get_batch(pool, [(tag, i) for i in range(200)])
                assert pages == [bytes([i]) * 4096 for i in range(200)]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=program, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert daemon.connections == 2
    # One session to the host for both programs (and the reporter).
    assert agent.app.agent.channels["g1"].sessions == 1
    assert daemon.client.connects == 1


def test_cli_goes_through_the_daemon(
    daemon: GuestDaemon, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = tmp_path / "page"
    src.write_bytes(b"via the daemon")
    assert guest_main(["--daemon-socket", daemon.path, "hello"]) == 0
    out = capsys.readouterr().out
    assert f"via=daemon:{daemon.path}" in out and "version=1" in out
    # MEM_REPORT is the daemon's alone: it is not offered to local programs.
    assert "mem_report" not in out
    assert guest_main(["--daemon-socket", daemon.path, "new-pool", "--persistent"]) == 0
    pool = capsys.readouterr().out.strip()
    assert guest_main(["--daemon-socket", daemon.path, "put", pool, "7", "0", str(src)]) == 0
    assert (
        guest_main(
            ["--daemon-socket", daemon.path, "get", pool, "7", "0", "-o", str(tmp_path / "out")]
        )
        == 0
    )
    assert (tmp_path / "out").read_bytes() == b"via the daemon".ljust(4096, b"\0")
    # Errors come back with the host's status: NO_POOL -> exit 2, one sentence.
    assert guest_main(["--daemon-socket", daemon.path, "get", "9", "1", "0"]) == 2
    assert "memd-guest:" in capsys.readouterr().err
    # A dedup request the daemon's session did not consent to is refused, not downgraded.
    assert (
        guest_main(["--daemon-socket", daemon.path, "--dedup", "--reconnect-timeout", "1", "hello"])
        == 2
    )
    assert "--dedup" in capsys.readouterr().err


def test_local_programs_cannot_send_memory_reports(daemon: GuestDaemon) -> None:
    client = daemon_client(daemon.path, timeout=5.0, reconnect_timeout=5.0)
    assert client is not None
    with client:
        reply = client.pipeline([MemReportRequest(1, 1, 0, 0, 0, 0, 0)])[0]
    assert isinstance(reply, wire.ErrorReply) and reply.status == Status.DENIED


def test_no_daemon_means_no_daemon_client(tmp_path: Path) -> None:
    assert daemon_client(str(tmp_path / "none.sock")) is None


def test_second_daemon_refuses_a_live_socket(agent: RunningAgent, daemon: GuestDaemon) -> None:
    other = GuestDaemon(agent.client(agent.add_guest("g2")), daemon.path, log=io.StringIO())
    with pytest.raises(wire.MemdError, match="another memd-guest daemon"):
        other.bind()
    assert os.path.exists(daemon.path)


# --- the host's validation of MEM_REPORT (sans-I/O) -------------------------------------------


def _hello(d: Dispatcher, g: GuestState, caps: int) -> None:
    frame = wire.FrameDecoder().feed(
        wire.encode_request(1, wire.HelloRequest(1, 1, caps, bytes(16)))
    )[0]
    assert isinstance(frame, wire.Frame)
    d.handle(g, frame)


def _report(d: Dispatcher, g: GuestState, payload: bytes) -> wire.Reply | wire.ErrorReply:
    raw = wire.encode_frame(Op.MEM_REPORT, 2, payload)
    frame = wire.FrameDecoder().feed(raw)[0]
    assert isinstance(frame, wire.Frame)
    reply = wire.FrameDecoder().feed(d.handle(g, frame))[0]
    assert isinstance(reply, wire.Frame)
    return wire.decode_reply(reply)


def _payload(*fields: int) -> bytes:
    return struct.pack("<QQQQIIII", *fields)  # docs/protocol.md, MEM_REPORT


def test_host_validates_memory_reports() -> None:
    d, g = Dispatcher(TmemHost(budget_bytes=1 << 20)), GuestState("g")
    _hello(d, g, int(Capability.MEM_REPORT))
    assert g.capabilities & Capability.MEM_REPORT
    bad = {
        "available above total": _payload(100, 200, 0, 0, 0, 0, 0, 0),
        "swap free above total": _payload(100, 50, 10, 20, 0, 0, 0, 0),
        "psi above 100 %": _payload(100, 50, 0, 0, 10001, 0, 0, 0),
        "psi with NO_PSI": _payload(100, 50, 0, 0, 5, 0, 1, 0),
        "unknown flag": _payload(100, 50, 0, 0, 0, 0, 2, 0),
        "reserved": _payload(100, 50, 0, 0, 0, 0, 0, 1),
        "short": _payload(100, 50, 0, 0, 0, 0, 0, 0)[:-1],
    }
    for what, payload in bad.items():
        reply = _report(d, g, payload)
        assert isinstance(reply, wire.ErrorReply), what
        assert reply.status in (Status.INVALID, Status.BAD_FRAME), (what, reply)
    assert g.memory is None and g.mem_reports == 0
    ok = _report(d, g, _payload(100, 50, 8, 8, 0, 0, 1, 0))
    assert isinstance(ok, wire.EmptyReply)
    assert g.memory_dict() is not None and g.memory_dict()["psi_some_avg10"] is None  # type: ignore[index]


def test_host_refuses_reports_it_did_not_grant() -> None:
    d, g = Dispatcher(TmemHost(budget_bytes=1 << 20)), GuestState("g")
    _hello(d, g, int(wire.ALL_CAPABILITIES))  # an older guest: no MEM_REPORT asked
    reply = _report(d, g, _payload(100, 50, 0, 0, 0, 0, 0, 0))
    assert isinstance(reply, wire.ErrorReply) and reply.status == Status.UNSUPPORTED_OP
    assert g.memory is None


def test_guest_reads_its_own_memory_state(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:  1000 kB\nMemFree:  10 kB\nMemAvailable:  600 kB\n"
        "SwapTotal:  50 kB\nSwapFree:  40 kB\nHugePages_Total: 0\n"
    )
    psi = tmp_path / "psi"
    psi.write_text(
        "some avg10=1.25 avg60=0.00 avg300=0.00 total=1\n"
        "full avg10=0.50 avg60=0.00 avg300=0.00 total=1\n"
    )
    assert memory_report(str(meminfo), str(psi)) == MemReportRequest(1000, 600, 50, 40, 125, 50, 0)
    assert memory_report(str(meminfo), str(tmp_path / "none")).flags == wire.MemReportFlag.NO_PSI
    assert read_psi(str(tmp_path / "none")) is None
    here = memory_report()  # this machine's, through the same code
    assert 0 < here.mem_available_kib <= here.mem_total_kib


# --- nominate a process's own memory: virtual range -> gfns (pagemap) in the daemon -----------


def _pagemap_frames(addr: int, pages: int) -> list[int]:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        entries = struct.unpack(f"<{pages}Q", f.read(8 * pages))
    return [e & ((1 << 55) - 1) if e >> 63 else wire.NO_GFN for e in entries]


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows frame numbers to root only")
def test_range_nominate_resolves_the_callers_own_pages(
    daemon: GuestDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = mmap.mmap(-1, 8 * 4096)
    for i in range(6):  # pages 6 and 7 are never touched: no frame
        buf[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        client = daemon_client(daemon.path, timeout=5.0, reconnect_timeout=5.0)
        assert client is not None
        with client:
            nominated = client.nominate_range(addr, 8 * 4096)
            queried = client.query_range(addr, 8 * 4096)
        frames = _pagemap_frames(addr, 8)
        # The daemon resolved this process's pages (SO_PEERCRED pid) to the same frames.
        assert [r.gfn for r in nominated] == frames == [q.gfn for q in queried]
        assert all(g != wire.NO_GFN for g in frames[:6]) and frames[6:] == [wire.NO_GFN] * 2
        assert [r.status for r in nominated[6:]] == [Status.NOT_SHAREABLE] * 2
        # These are host frames far past the simulated guest's 256 pages: the host said so
        # per page (the agent's own answer, not the daemon's).
        assert all(r.status != Status.OK for r in nominated[:6])
        assert all(q.state == wire.ShareState.UNKNOWN for q in queried)
        # The CLI, naming this process: hex in, hex out.
        assert (
            guest_main(
                [
                    "--daemon-socket",
                    daemon.path,
                    "query",
                    "--pid",
                    str(os.getpid()),
                    "--range",
                    f"{addr:#x}:0x2000",
                ]
            )
            == 0
        )
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            f"{addr:#x} {frames[0]:#x} unknown 0",
            f"{addr + 4096:#x} {frames[1]:#x} unknown 0",
        ]
    finally:
        buf.close()


def test_range_of_another_users_process_is_denied(daemon: GuestDaemon) -> None:
    session = LocalSession(daemon, socket.socket(socket.AF_UNIX), os.getpid(), 4242, 4242)
    session.version = 1
    frame = wire.Frame(Op.RANGE_NOMINATE, 9, 0, 0, 1, b"")
    [reply_frame] = wire.FrameDecoder().feed(
        session._local(frame, wire.RangeNominateRequest(1, 0x400000, 4096))
    )
    assert isinstance(reply_frame, wire.Frame)
    reply = wire.decode_reply(reply_frame)
    assert isinstance(reply, wire.ErrorReply) and reply.status == Status.DENIED
    assert "another user" in reply.message
    session.conn.close()


def test_range_must_be_page_aligned(daemon: GuestDaemon) -> None:
    client = daemon_client(daemon.path, timeout=5.0, reconnect_timeout=5.0)
    assert client is not None
    with client, pytest.raises(wire.MemdError, match="page-aligned"):
        client.nominate_range(0x1001, 4096)
    assert guest_main(["--daemon-socket", daemon.path, "nominate"]) == 2


def test_a_host_answers_the_local_range_ops_unsupported() -> None:
    d, g = Dispatcher(TmemHost(budget_bytes=1 << 20)), GuestState("g")
    _hello(d, g, int(wire.ALL_CAPABILITIES))
    raw = wire.encode_request(3, wire.RangeNominateRequest(0, 0x1000, 0x1000))
    frame = wire.FrameDecoder().feed(raw)[0]
    assert isinstance(frame, wire.Frame)
    reply = wire.decode_reply(wire.FrameDecoder().feed(d.handle(g, frame))[0])  # type: ignore[arg-type]
    assert isinstance(reply, wire.ErrorReply) and reply.status == Status.UNSUPPORTED_OP


def test_a_daemon_closed_at_once_leaves_no_thread_error(
    agent: RunningAgent, tmp_path: Path
) -> None:
    """close() right after start() used to race the accept thread, which set the timeout of
    a listener close() had already closed (OSError in the thread, seen in a suite run)."""
    errors: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        port = agent.add_guest("quick")
        for i in range(30):
            d = GuestDaemon(
                agent.client(port), str(tmp_path / f"q{i}.sock"), interval=60, log=io.StringIO()
            )
            d.start()
            d.close()
    finally:
        threading.excepthook = previous
    assert errors == []
