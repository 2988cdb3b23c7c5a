"""The typed control-command table (memd.agent.commands) and how the agent serves it."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memd.agent import control
from memd.agent.app import AgentApp
from memd.agent.commands import (
    SHAPES,
    Command,
    CommandArgs,
    KsmArgs,
    PoolsArgs,
    StatusArgs,
    SwapArgs,
    UnknownCommand,
    parse,
    to_wire,
)
from memd.agent.control import handler_table, handles
from memd.errors import InvalidArgument, MemdError
from tests.agent.conftest import RunningAgent


def test_every_command_has_one_shape_that_knows_it() -> None:
    assert set(SHAPES) == set(Command)
    for command, shape in SHAPES.items():
        assert shape.command is command
        assert dataclasses.is_dataclass(shape) and shape.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_the_agent_has_exactly_one_handler_per_command() -> None:
    app = AgentApp(budget_bytes=8 << 20)
    assert set(app.control.commands) == set(Command)
    # AgentApp itself handles no command: it only wires and runs the lifecycle.
    public = {n for n, v in vars(AgentApp).items() if callable(v) and not n.startswith("_")}
    assert public == {"start", "stop", "catch_signals", "run_until_signalled"}


def test_a_wiring_mistake_shows_when_the_table_is_built() -> None:
    class Half:
        @handles(Command.STATUS)
        def status(self, args: StatusArgs) -> None: ...

    with pytest.raises(TypeError, match="no handler for the control commands guests"):
        handler_table(Half())

    class Wrong:
        @handles(Command.POOLS)
        def pools(self, args: StatusArgs) -> None: ...

    with pytest.raises(TypeError, match="must be PoolsArgs"):
        handler_table(Wrong())

    app = AgentApp(budget_bytes=8 << 20)
    with pytest.raises(TypeError, match="two handlers"):
        handler_table(app.handlers, Half())


def test_a_shape_cannot_be_given_twice() -> None:
    with pytest.raises(TypeError, match="already has the shape"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Again(CommandArgs):
            command = Command.STATUS


_TEXT = st.text(min_size=1, max_size=20)
_INT = st.integers(min_value=-(1 << 62), max_value=1 << 62)
_VALUES = {
    str: _TEXT,
    int: _INT,
    bool: st.booleans(),
    str | None: st.none() | _TEXT,
    int | None: st.none() | _INT,
}


@st.composite
def _requests(draw: st.DrawFn) -> CommandArgs:
    import typing

    shape = draw(st.sampled_from(sorted(SHAPES.values(), key=lambda s: s.__name__)))
    hints = typing.get_type_hints(shape)
    values = {f.name: draw(_VALUES[hints[f.name]]) for f in dataclasses.fields(shape)}
    return shape(**values)


@given(_requests())
def test_what_the_cli_sends_the_agent_reads_back(args: CommandArgs) -> None:
    name, raw = to_wire(args)
    assert parse(name, json.loads(json.dumps(raw))) == args


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("pools", {"guset": "a"}, "pools does not take 'guset' (it takes guest)"),
        ("status", {"verbose": True}, "status does not take 'verbose' (it takes no arguments)"),
        ("budget", {}, "missing argument 'bytes'"),
        ("budget", {"bytes": "1G"}, "argument 'bytes' must be an integer"),
        ("budget", {"bytes": True}, "argument 'bytes' must be an integer"),
        ("steer", {"on": "yes"}, "argument 'on' must be true or false"),
        ("freeze", {"guest": ""}, "argument 'guest' must be a non-empty string"),
        (
            "swap",
            {"name": "a", "path": "/x", "size": 4096, "uid": "0"},
            "argument 'uid' must be an integer",
        ),
    ],
)
def test_bad_arguments_are_one_sentence(name: str, raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(name, raw)
    assert str(info.value) == message


def test_defaults_and_unknown_commands() -> None:
    assert parse("ksm", {}) == KsmArgs(step=False)
    assert parse("pools", {"guest": None}) == PoolsArgs()
    assert to_wire(SwapArgs(name="a", path="/s", size=4096)) == (
        "swap",
        {"name": "a", "path": "/s", "size": 4096},
    )
    with pytest.raises(UnknownCommand):
        parse("reboot-host", {})


def _raw(path: str, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            assert chunk
            reply += chunk
    out: dict[str, Any] = json.loads(reply)
    return out


def test_the_control_socket_answers_bad_requests_and_stays_up(agent: RunningAgent) -> None:
    bad = {
        b'{"cmd": "reboot-host"}\n': ("BadRequest", "unknown command 'reboot-host'"),
        b'{"cmd": "pools", "args": {"guset": "g"}}\n': (
            "InvalidArgument",
            "pools does not take 'guset' (it takes guest)",
        ),
        b'{"cmd": "budget", "args": {"bytes": "lots"}}\n': (
            "InvalidArgument",
            "argument 'bytes' must be an integer",
        ),
        b'{"cmd": "drop", "args": {}}\n': ("InvalidArgument", "missing argument 'guest'"),
        b'{"cmd": 7}\n': ("BadRequest", "malformed control request"),
        b"not json\n": ("BadRequest", "malformed control request"),
    }
    for line, (kind, message) in bad.items():
        reply = _raw(agent.control, line)
        assert reply["ok"] is False, line
        assert (reply["error"]["error"], reply["error"]["message"]) == (kind, message)
    # The CLI side rebuilds the error as one MemdError with the agent's sentence.
    with pytest.raises(MemdError, match="does not take 'x'"):
        control.call("status", {"x": 1}, path=agent.control)
    # and the agent is still there, serving typed requests
    assert control.request(StatusArgs(), path=agent.control)["runstate"] == "running"
    assert control.request(PoolsArgs(), path=agent.control) == []
