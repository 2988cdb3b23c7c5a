"""The operator's control commands: one typed table that the CLI and the agent share.

Owns the vocabulary of the control socket (memd.agent.control carries it as JSON
lines): :class:`Command` names every command as it travels on the wire, and each
command has one frozen dataclass, its *argument shape* (``PoolsArgs`` for
``Command.POOLS``, ...), that knows its command (``args.command``).  The CLI builds
these objects and sends them (:func:`to_wire`); the agent rebuilds them from the JSON
it receives (:func:`parse`), which checks every field against the shape, so a handler
only ever sees well-typed arguments, and an unknown command, an unknown or missing
argument or one of the wrong type is one sentence back to the operator.

Adding a command: a member of :class:`Command`, its argument dataclass here (with
``command: ClassVar[Command] = Command.X``), and one handler marked
``@handles(Command.X)`` (memd.agent.control) on the component that serves it.  The
shape registers itself; ``tests/agent/test_commands.py`` checks that every command has
exactly one shape and, in a running agent, exactly one handler.

Pure data: no I/O, no threads; safe to use from any thread.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from memd.errors import InvalidArgument


class Command(StrEnum):
    """Every control command, by the name it has on the wire."""

    STATUS = "status"
    GUESTS = "guests"
    POOLS = "pools"
    STATS = "stats"
    CLIENTS = "clients"
    AUDIT = "audit"
    EXPLAIN = "explain"
    SCAN = "scan"
    KSM = "ksm"
    STEER = "steer"
    OPTOUT = "optout"
    OPTIN = "optin"
    ATTACH = "attach"
    DETACH = "detach"
    SWAP = "swap"
    UNSWAP = "unswap"
    BUDGET = "budget"
    DROP = "drop"
    AUTHORIZE = "authorize"
    FREEZE = "freeze"
    THAW = "thaw"
    MIGRATE = "migrate"
    MIGRATIONS = "migrations"
    CANCEL_MIGRATION = "cancel-migration"


class UnknownCommand(ValueError):
    """The request names no :class:`Command` (the control socket answers ``BadRequest``)."""


#: Command → its argument shape; filled by CommandArgs subclasses as they are defined.
SHAPES: dict[Command, type[CommandArgs]] = {}


@dataclass(frozen=True, kw_only=True)
class CommandArgs:
    """Base of every argument shape.  Fields are ``str``, ``int``, ``bool`` or one of
    those ``| None``; a field with a default may be left out on the wire."""

    command: ClassVar[Command]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.command in SHAPES:
            raise TypeError(f"{cls.command} already has the shape {SHAPES[cls.command]}")
        SHAPES[cls.command] = cls


# -- the shapes, in the order of Command ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StatusArgs(CommandArgs):
    command: ClassVar[Command] = Command.STATUS


@dataclass(frozen=True, kw_only=True)
class GuestsArgs(CommandArgs):
    command: ClassVar[Command] = Command.GUESTS


@dataclass(frozen=True, kw_only=True)
class PoolsArgs(CommandArgs):
    command: ClassVar[Command] = Command.POOLS
    #: Only this guest's pools (None: every client's).
    guest: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatsArgs(CommandArgs):
    command: ClassVar[Command] = Command.STATS
    #: Only this guest's figures (None: every guest's).
    guest: str | None = None


@dataclass(frozen=True, kw_only=True)
class ClientsArgs(CommandArgs):
    command: ClassVar[Command] = Command.CLIENTS


@dataclass(frozen=True, kw_only=True)
class AuditArgs(CommandArgs):
    command: ClassVar[Command] = Command.AUDIT


@dataclass(frozen=True, kw_only=True)
class ExplainArgs(CommandArgs):
    command: ClassVar[Command] = Command.EXPLAIN
    #: ``VM:GFN`` (``memd audit --gfn``).
    page: str


@dataclass(frozen=True, kw_only=True)
class ScanArgs(CommandArgs):
    command: ClassVar[Command] = Command.SCAN


@dataclass(frozen=True, kw_only=True)
class KsmArgs(CommandArgs):
    command: ClassVar[Command] = Command.KSM
    #: Run one steering step now (making the steering if there is none) before reporting.
    step: bool = False


@dataclass(frozen=True, kw_only=True)
class SteerArgs(CommandArgs):
    command: ClassVar[Command] = Command.STEER
    #: Start (true) or stop (false) the steering loop.
    on: bool


@dataclass(frozen=True, kw_only=True)
class OptOutArgs(CommandArgs):
    command: ClassVar[Command] = Command.OPTOUT
    vm: str


@dataclass(frozen=True, kw_only=True)
class OptInArgs(CommandArgs):
    command: ClassVar[Command] = Command.OPTIN
    vm: str


@dataclass(frozen=True, kw_only=True)
class AttachArgs(CommandArgs):
    command: ClassVar[Command] = Command.ATTACH
    name: str
    #: The guest's channel socket.
    path: str
    #: ``connect`` (QEMU listens) or ``listen`` (the agent does).
    mode: str = "connect"


@dataclass(frozen=True, kw_only=True)
class DetachArgs(CommandArgs):
    command: ClassVar[Command] = Command.DETACH
    name: str


@dataclass(frozen=True, kw_only=True)
class SwapArgs(CommandArgs):
    command: ClassVar[Command] = Command.SWAP
    name: str
    #: The NBD unix socket to serve the disk on (absolute).
    path: str
    #: Disk size in bytes.
    size: int
    #: Owner of the socket (with gid): the guest's QEMU user; None leaves the agent's.
    uid: int | None = None
    gid: int | None = None
    #: The only process the disk is served to (the guest's QEMU); None: any allowed peer.
    pid: int | None = None


@dataclass(frozen=True, kw_only=True)
class UnswapArgs(CommandArgs):
    command: ClassVar[Command] = Command.UNSWAP
    name: str


@dataclass(frozen=True, kw_only=True)
class BudgetArgs(CommandArgs):
    command: ClassVar[Command] = Command.BUDGET
    bytes: int


@dataclass(frozen=True, kw_only=True)
class DropArgs(CommandArgs):
    command: ClassVar[Command] = Command.DROP
    guest: str
    #: The operator confirmed (the agent refuses a drop without it).
    confirm: bool = False


@dataclass(frozen=True, kw_only=True)
class AuthorizeArgs(CommandArgs):
    command: ClassVar[Command] = Command.AUTHORIZE
    guest: str
    #: The shared pool's uuid.
    uuid: str


@dataclass(frozen=True, kw_only=True)
class FreezeArgs(CommandArgs):
    command: ClassVar[Command] = Command.FREEZE
    guest: str


@dataclass(frozen=True, kw_only=True)
class ThawArgs(CommandArgs):
    command: ClassVar[Command] = Command.THAW
    guest: str


@dataclass(frozen=True, kw_only=True)
class MigrateArgs(CommandArgs):
    command: ClassVar[Command] = Command.MIGRATE
    guest: str
    #: The destination agent's migration listener, ``HOST:PORT``.
    to: str
    #: The source QEMU's QMP socket (absolute): follow the migration started there (memd
    #: arms pause-before-switchover and answers once the bulk is across).  None: follow
    #: libvirt's migration when the agent follows libvirt and it runs the guest
    #: (memd.migrate.libvirt), else move the (paused or stopped) guest now.
    qmp: str | None = None
    #: Following libvirt: seconds to wait for its migration job before giving up (a
    #: ``virsh migrate`` refused or failed before it started leaves no trace memd can
    #: see); None: memd.migrate.libvirt.ARM_SECONDS.
    arm_timeout: int | None = None


@dataclass(frozen=True, kw_only=True)
class MigrationsArgs(CommandArgs):
    command: ClassVar[Command] = Command.MIGRATIONS


@dataclass(frozen=True, kw_only=True)
class CancelMigrationArgs(CommandArgs):
    command: ClassVar[Command] = Command.CANCEL_MIGRATION
    #: The guest whose outgoing transfer stops (``memd migrate GUEST --cancel``).
    guest: str


# -- wire ------------------------------------------------------------------------------------


def to_wire(args: CommandArgs) -> tuple[str, dict[str, Any]]:
    """(command name, JSON arguments) for a request; None fields are left out."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    return str(args.command), {k: v for k, v in fields.items() if v is not None}


def parse(name: str, raw: dict[str, Any]) -> CommandArgs:
    """The typed arguments of a request as it came off the wire.

    Raises :class:`UnknownCommand` for a name that is no command, and InvalidArgument
    (one sentence) for an unknown argument, a missing one or one of the wrong type."""
    try:
        command = Command(name)
    except ValueError:
        raise UnknownCommand(f"unknown command {name!r}") from None
    shape = SHAPES[command]
    hints = typing.get_type_hints(shape)
    fields = {f.name: f for f in dataclasses.fields(shape)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        takes = ", ".join(fields) or "no arguments"
        raise InvalidArgument(
            f"{command} does not take {unknown[0]!r} (it takes {takes})", op=str(command)
        )
    values: dict[str, Any] = {}
    for field_name, field in fields.items():
        if field_name not in raw or raw[field_name] is None:
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if required:
                raise InvalidArgument(f"missing argument {field_name!r}", op=str(command))
            continue
        values[field_name] = _checked(command, field_name, raw[field_name], hints[field_name])
    return shape(**values)


def _checked(command: Command, name: str, value: object, hint: object) -> object:
    kind = _base_type(hint)
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgument(f"argument {name!r} must be true or false", op=str(command))
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"argument {name!r} must be an integer", op=str(command))
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"argument {name!r} must be a non-empty string", op=str(command))
    else:  # a shape with a field type this parser does not know: a bug, caught by tests
        raise TypeError(f"{command}.{name}: unsupported argument type {hint!r}")
    return value


def _base_type(hint: object) -> object:
    """``str | None`` → ``str``; plain types as they are."""
    if isinstance(hint, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        return members[0] if len(members) == 1 else hint
    return hint
