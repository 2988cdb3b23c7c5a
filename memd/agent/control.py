"""The operator control socket: JSON lines over a unix socket, root/owner only.

Request  ``{"cmd": "audit", "args": {...}}\\n``
Reply    ``{"ok": true, "result": ...}\\n`` or ``{"ok": false, "error": {...}}\\n``
(``error`` is :meth:`MemdError.to_dict`: ``error`` class name, ``message``, fields).

The commands and the shape of their arguments are memd.agent.commands; the server
checks each request against its shape before a handler sees it (a bad request costs
one error reply, never the connection or the agent).  Handlers are methods of the
components that serve them, marked with :func:`handles`; :func:`handler_table`
collects them, one per command.

Who may connect: the socket file is mode 0600, and every connection's peer
credentials (``SO_PEERCRED``) are checked: only root and the agent's own user are
served — a guest's QEMU process running as another user cannot steer the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from memd import paths
from memd.agent.commands import SHAPES, Command, CommandArgs, UnknownCommand, parse, to_wire
from memd.errors import AgentNotRunning, BackendError, MemdError, PermissionDenied

log = logging.getLogger("memd.control")

DEFAULT_CONTROL_PATH = str(paths.PRODUCTION_RUN_DIR / "memd.sock")
MAX_REQUEST = 1 << 20

#: A command's handler as the server runs it: typed arguments in, a JSON-able result out.
Handler = Callable[[CommandArgs], Awaitable[Any]]
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Mark:
    command: Command
    #: Run the (blocking) handler in a worker thread rather than on the event loop.
    thread: bool


_MARK = "_memd_control_command"


def handles(command: Command, *, thread: bool = False) -> Callable[[_F], _F]:
    """Mark a method as the handler of *command*; its one parameter is the command's
    argument shape.  A plain method runs on the event loop (it must not block), or with
    ``thread=True`` in a worker thread; an ``async`` method is awaited on the loop."""

    def mark(fn: _F) -> _F:
        vars(fn)[_MARK] = _Mark(command, thread)
        return fn

    return mark


def handler_table(*components: object) -> dict[Command, Handler]:
    """Every command's handler among the marked methods of *components*.

    Raises TypeError unless each command has exactly one handler whose parameter is
    that command's argument shape: a wiring mistake shows at start-up, not when an
    operator first runs the command."""
    table: dict[Command, Handler] = {}
    for component in components:
        for attr in dir(type(component)):
            mark = getattr(getattr(type(component), attr), _MARK, None)
            if not isinstance(mark, _Mark):
                continue
            if mark.command in table:
                raise TypeError(f"two handlers for the control command {mark.command}")
            method = getattr(component, attr)
            hints = typing.get_type_hints(method)
            params = [v for k, v in hints.items() if k != "return"]
            if params != [SHAPES[mark.command]]:
                raise TypeError(
                    f"{type(component).__name__}.{attr} handles {mark.command}: "
                    f"its parameter must be {SHAPES[mark.command].__name__}"
                )
            table[mark.command] = _runner(method, mark.thread)
    missing = [str(c) for c in Command if c not in table]
    if missing:
        raise TypeError(f"no handler for the control commands {', '.join(missing)}")
    return table


def _runner(method: Callable[[Any], Any], thread: bool) -> Handler:
    if asyncio.iscoroutinefunction(method):
        if thread:
            raise TypeError(
                f"{method.__qualname__} is async: it runs on the loop, not in a worker thread"
            )
        return typing.cast(Handler, method)
    if thread:

        async def in_thread(args: CommandArgs) -> Any:
            return await asyncio.to_thread(method, args)

        return in_thread

    async def on_loop(args: CommandArgs) -> Any:
        return method(args)

    return on_loop


def control_path() -> str:
    """``$MEMD_SOCKET``, else ``<run dir>/memd.sock`` (see :mod:`memd.paths`)."""
    return str(paths.control_socket())


class ControlServer:
    """Serves the commands of a handler table; one JSON request per line."""

    def __init__(self, commands: Mapping[Command, Handler]) -> None:
        self.commands = dict(commands)
        self._server: asyncio.Server | None = None
        self.path: str | None = None

    async def start(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            if paths.socket_accepts(path):
                raise BackendError(f"another memd agent is already serving {path}", target=path)
            os.unlink(path)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        self.path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _peer_allowed(writer.get_extra_info("socket")):
                await _send(
                    writer,
                    {
                        "ok": False,
                        "error": PermissionDenied(
                            "only root or the agent's user may use the control socket"
                        ).to_dict(),
                    },
                )
                return
            while line := await reader.readline():
                await _send(writer, await self._run(line))
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _run(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            cmd, raw = request["cmd"], request.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(raw, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return {
                "ok": False,
                "error": {"error": "BadRequest", "message": "malformed control request"},
            }
        try:
            args = parse(cmd, raw)
            handler = self.commands[args.command]
        except (UnknownCommand, KeyError):
            return {
                "ok": False,
                "error": {"error": "BadRequest", "message": f"unknown command {cmd!r}"},
            }
        except MemdError as err:
            return {"ok": False, "error": err.to_dict()}
        try:
            return {"ok": True, "result": await handler(args)}
        except MemdError as err:
            return {"ok": False, "error": err.to_dict()}
        except Exception:
            log.exception("control command %s failed", cmd)
            message = f"{cmd} failed inside the agent (see its log)"
            return {"ok": False, "error": {"error": "InternalError", "message": message}}


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


def _peer_allowed(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def request(args: CommandArgs, *, path: str | None = None, timeout: float = 600.0) -> Any:
    """Run one control command against a running agent; raise its error as MemdError."""
    cmd, raw = to_wire(args)
    return call(cmd, raw, path=path, timeout=timeout)


def call(
    cmd: str, args: dict[str, Any] | None = None, *, path: str | None = None, timeout: float = 600.0
) -> Any:
    """:func:`request` with the command and arguments as they go on the wire (JSON),
    unchecked: what a script or a test that speaks the socket's raw format uses."""
    path = path or control_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise AgentNotRunning(
                f"the memd agent is not running (no control socket at {path}); "
                "start it with 'memd serve'",
                target=path,
            ) from None
        except ConnectionRefusedError:
            raise AgentNotRunning(
                f"the memd agent is not running (stale control socket at {path}); "
                "start it with 'memd serve'",
                target=path,
            ) from None
        except PermissionError:
            raise PermissionDenied(
                f"permission denied on {path}: run memd as root or as the agent's user", target=path
            ) from None
        except OSError as err:
            if err.errno == errno.ENOTSOCK:
                raise AgentNotRunning(f"{path} is not a memd control socket", target=path) from err
            raise
        sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise AgentNotRunning("the memd agent closed the control connection", target=path)
            buf += chunk
    finally:
        sock.close()
    reply = json.loads(buf)
    if reply.get("ok"):
        return reply.get("result")
    raise remote_error(reply.get("error") or {})


def remote_error(err: dict[str, Any]) -> MemdError:
    """Rebuild an agent-side error so the CLI prints its one sentence."""
    import memd.errors as errors

    cls = getattr(errors, str(err.get("error")), None)
    message = str(err.get("message", "the agent reported an error"))
    fields = {k: v for k, v in err.items() if k not in ("error", "message")}
    if isinstance(cls, type) and issubclass(cls, MemdError):
        try:
            return cls(message, **fields)
        except TypeError:
            pass
    return MemdError(message, **fields)
