"""``memd-guest``: the guest agent's command line (also ``python3 -m memd.guest``).

One invocation = one connection (resync + hello) = one command.  When the guest daemon
(``memd-guest daemon``, memd.guest.daemon) runs, that connection goes to its unix socket and
the daemon forwards the command over its session; otherwise the command opens the port
itself.  ``--direct`` (or ``--port``/``--device``/``--socket``) skips the daemon.  Output is
plain ``key=value`` / columns text (python3-minimal has no json).  Exit status: 0 success,
1 ``get`` found nothing, 2 error (one sentence on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from typing import Any

from memd.errors import MemdError
from memd.guest.client import GuestClient
from memd.guest.daemon import REPORT_INTERVAL, GuestDaemon, memory_report, socket_path
from memd.guest.transport import SocketTransport, Transport, list_ports
from memd.wire import (
    ALL_CAPABILITIES,
    NO_GFN,
    PAGE_SIZE,
    PORT_NAME,
    Capability,
    Oid,
    PoolFlag,
    ShareState,
    Status,
)

EXIT_OK, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2


def _int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _oid(text: str) -> int | Oid:
    """``N`` (a 192-bit integer) or ``A:B:C`` (three u64 words, least significant first)."""
    parts = text.split(":")
    if len(parts) == 3:
        words = (_int(parts[0]), _int(parts[1]), _int(parts[2]))
        if any(w >= 1 << 64 for w in words):
            raise argparse.ArgumentTypeError(f"{text!r}: each word must fit in 64 bits")
        return words
    value = _int(text)
    if value >= 1 << 192:
        raise argparse.ArgumentTypeError(f"{text!r} does not fit in 192 bits")
    return value


def _range(text: str) -> tuple[int, int]:
    """``ADDR:LEN`` (each hex with 0x, or decimal)."""
    addr, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:LEN")
    return _int(addr), _int(length)


def _uuid(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 128-bit uuid (32 hex digits)")
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memd-guest", description="Talk to the memd host agent from inside a guest."
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        default=None,
        help=f"virtio-serial port name (default {PORT_NAME}); opens the port "
        "itself, never through the daemon",
    )
    where.add_argument("--device", help="open this character device instead of looking up --port")
    where.add_argument("--socket", help="connect to this unix socket (development, tests)")
    p.add_argument(
        "--direct",
        action="store_true",
        help="open the port even if the memd-guest daemon runs (it holds the port: "
        "only for a guest without the daemon)",
    )
    p.add_argument(
        "--daemon-socket",
        default=None,
        help="the daemon's unix socket (default $MEMD_GUEST_SOCKET or /run/memd-guest.sock)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    p.add_argument(
        "--dedup",
        action="store_true",
        help="consent to cross-guest de-duplication of the pages this command puts "
        "(saves host memory; lets other guests time-probe for equal content)",
    )
    p.add_argument(
        "--reconnect-timeout",
        type=float,
        default=30.0,
        help="seconds to keep trying to (re)connect",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("ports", help="list the virtio-serial ports of this guest")
    c = sub.add_parser(
        "daemon",
        help="own the port: keep the session, serve local programs on "
        "a unix socket, report memory to the host",
    )
    c.add_argument(
        "--listen", default=None, help="unix socket for local programs (default: --daemon-socket)"
    )
    c.add_argument(
        "--mode",
        type=lambda t: int(t, 8),
        default=0o660,
        help="permissions of the socket, octal (default 660: root and its group)",
    )
    c.add_argument(
        "--interval",
        type=float,
        default=REPORT_INTERVAL,
        help=f"seconds between memory reports (default {REPORT_INTERVAL:g})",
    )
    c.add_argument("--verbose", action="store_true", help="log every local client (pid, uid)")
    sub.add_parser("memstate", help="print the memory report the daemon sends (no host needed)")
    sub.add_parser("hello", help="connect and show the negotiated version and host limits")
    sub.add_parser("pools", help="list this guest's pools")
    sub.add_parser("stats", help="show the host's statistics for this guest")
    c = sub.add_parser("new-pool", help="create a pool and print its id")
    c.add_argument("--persistent", action="store_true")
    c.add_argument("--shared-uuid", type=_uuid, help="join the shared pool with this uuid")
    c = sub.add_parser("destroy-pool", help="destroy a pool and its pages")
    c.add_argument("pool", type=_int)
    c = sub.add_parser("put", help="store a page (from FILE or stdin, zero-padded to 4096)")
    c.add_argument("pool", type=_int)
    c.add_argument("oid", type=_oid)
    c.add_argument("index", type=_int)
    c.add_argument("file", nargs="?", default="-")
    c = sub.add_parser("get", help="fetch a page (to stdout, or -o FILE)")
    c.add_argument("pool", type=_int)
    c.add_argument("oid", type=_oid)
    c.add_argument("index", type=_int)
    c.add_argument("-o", "--output", default="-")
    c.add_argument("--hex", action="store_true", help="print hex instead of raw bytes")
    c = sub.add_parser("flush", help="flush a page, or a whole object when INDEX is omitted")
    c.add_argument("pool", type=_int)
    c.add_argument("oid", type=_oid)
    c.add_argument("index", type=_int, nargs="?")
    for name, what, prints in (
        ("nominate", "offer pages for sharing", "status handle"),
        ("query", "sharing state of pages", "state share_count"),
    ):
        c = sub.add_parser(
            name,
            help=f"{what}: gfns (hex like 0x1a2b, or decimal), or "
            f"--range of a process through the daemon; prints gfn {prints} "
            "(gfns in hex)",
        )
        c.add_argument("gfns", type=_int, nargs="*")
        c.add_argument(
            "--range",
            type=_range,
            metavar="ADDR:LEN",
            help="a virtual address range (hex or decimal, page-aligned) of --pid; "
            "the daemon resolves it to gfns through /proc/PID/pagemap",
        )
        c.add_argument(
            "--pid",
            type=_int,
            default=0,
            help="the process whose range it is (root, or its own user)",
        )
    c = sub.add_parser("about-to-write", help="ask the host to unshare a gfn before a write")
    c.add_argument("gfn", type=_int)
    return p


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"timeout": args.timeout, "reconnect_timeout": args.reconnect_timeout}
    if args.dedup:
        options["capabilities"] = ALL_CAPABILITIES | int(Capability.DEDUP_OPT_IN)
    return options


def _port_client(args: argparse.Namespace, options: dict[str, Any]) -> GuestClient:
    if args.socket:
        return GuestClient.for_unix_socket(args.socket, **options)
    if args.device:
        return GuestClient.for_device(args.device, **options)
    return GuestClient.for_port(args.port or PORT_NAME, **options)


def daemon_client(path: str | None = None, **options: Any) -> GuestClient | None:
    """A client of the running guest daemon, or None when nothing listens on its socket."""
    path = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    first = [sock]

    def connect() -> Transport:
        if first:
            return SocketTransport(first.pop(), f"daemon:{path}")
        return SocketTransport.connect_unix(path)

    # The daemon may itself be reconnecting to the host: wait as long as that may take.
    options["timeout"] = options.get("timeout", 10.0) + options.get("reconnect_timeout", 30.0)
    return GuestClient(connect, **options)


def _client(args: argparse.Namespace) -> tuple[GuestClient, str]:
    """The client for this command and how it reaches the host (for `hello`)."""
    options = _options(args)
    if not (args.direct or args.socket or args.device or args.port):
        client = daemon_client(args.daemon_socket, **options)
        if client is not None:
            return client, f"daemon:{args.daemon_socket or socket_path()}"
    return _port_client(args, options), "direct"


def _read_page(path: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(PAGE_SIZE + 1)
    else:
        with open(path, "rb") as f:
            data = f.read(PAGE_SIZE + 1)
    if len(data) > PAGE_SIZE:
        raise ValueError(f"{path}: a page is at most {PAGE_SIZE} bytes")
    return data.ljust(PAGE_SIZE, b"\0")


def _gfn(gfn: int) -> str:
    return "-" if gfn == NO_GFN else f"{gfn:#x}"


def _flag_names(flags: int) -> str:
    names = [f.name.lower() for f in PoolFlag if f & flags and f.name]
    return ",".join(names) or "ephemeral"


def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.command == "ports":
        for name, dev in sorted(list_ports().items()):
            out.write(f"{name} {dev}\n")
        return EXIT_OK
    if args.command == "memstate":
        m = memory_report()
        for key, value in m._asdict().items():
            out.write(f"{key}={value}\n")
        return EXIT_OK
    if args.command == "daemon":
        options = _options(args)
        options["capabilities"] = options.get("capabilities", ALL_CAPABILITIES) | int(
            Capability.MEM_REPORT
        )
        client = _port_client(args, options)
        GuestDaemon(
            client,
            args.listen or args.daemon_socket or socket_path(),
            interval=args.interval,
            mode=args.mode,
            verbose=args.verbose,
        ).run()
        return EXIT_OK
    client, via = _client(args)
    with client:
        if args.command == "hello":
            h = client.connect()
            caps = ",".join(c.name.lower() for c in Capability if c & h.capabilities and c.name)
            out.write(
                f"version={h.version}\ncapabilities={caps or '-'}\nmax_batch={h.max_batch}\n"
                f"max_payload={h.max_payload}\nmax_gfns={h.max_gfns}\n"
                f"page_size={h.page_size}\nvia={via}\n"
            )
        elif args.command == "pools":
            for p in client.list_pools():
                uuid = p.uuid.hex() if p.flags & PoolFlag.SHARED else "-"
                out.write(f"{p.pool} {_flag_names(p.flags)} {uuid} {p.pages}\n")
        elif args.command == "stats":
            for key, value in client.stats().items():
                out.write(f"{key}={value}\n")
        elif args.command == "new-pool":
            pool = client.new_pool(persistent=args.persistent, shared_uuid=args.shared_uuid)
            out.write(f"{pool}\n")
        elif args.command == "destroy-pool":
            client.destroy_pool(args.pool)
        elif args.command == "put":
            client.put(args.pool, args.oid, args.index, _read_page(args.file))
        elif args.command == "get":
            page = client.get(args.pool, args.oid, args.index)
            if page is None:
                sys.stderr.write("memd-guest: no page under that handle\n")
                return EXIT_NOT_FOUND
            data = (page.hex() + "\n").encode() if args.hex else page
            if args.output == "-":
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            else:
                with open(args.output, "wb") as f:
                    f.write(data)
        elif args.command == "flush":
            if args.index is None:
                client.flush_object(args.pool, args.oid)
            else:
                client.flush_page(args.pool, args.oid, args.index)
        elif args.command in ("nominate", "query") and args.range is not None:
            if args.gfns or not via.startswith("daemon:"):
                raise ValueError(
                    "--range takes no gfns and needs the memd-guest daemon (it "
                    "reads /proc/PID/pagemap): is `memd-guest daemon` running?"
                )
            addr, length = args.range
            if args.command == "nominate":
                for i, item in enumerate(client.nominate_range(addr, length, args.pid)):
                    out.write(
                        f"{addr + i * PAGE_SIZE:#x} {_gfn(item.gfn)} "
                        f"{Status(item.status).name.lower()} {item.handle}\n"
                    )
            else:
                for i, q in enumerate(client.query_range(addr, length, args.pid)):
                    out.write(
                        f"{addr + i * PAGE_SIZE:#x} {_gfn(q.gfn)} "
                        f"{ShareState(q.state).name.lower()} {q.share_count}\n"
                    )
        elif args.command in ("nominate", "query") and not args.gfns:
            raise ValueError(f"{args.command}: name gfns, or --range ADDR:LEN")
        elif args.command == "nominate":
            for gfn, r in zip(args.gfns, client.nominate(args.gfns), strict=True):
                out.write(f"{gfn:#x} {Status(r.status).name.lower()} {r.handle}\n")
        elif args.command == "query":
            for gfn, s in zip(args.gfns, client.share_query(args.gfns), strict=True):
                out.write(f"{gfn:#x} {ShareState(s.state).name.lower()} {s.share_count}\n")
        elif args.command == "about-to-write":
            client.about_to_write(args.gfn)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except MemdError as err:
        sys.stderr.write(f"memd-guest: {err}\n")
    except (OSError, ValueError) as err:
        sys.stderr.write(f"memd-guest: {err}\n")
    except KeyboardInterrupt:
        sys.stderr.write("memd-guest: interrupted\n")
    return EXIT_ERROR
