"""The import direction of docs/architecture.md, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("memd", "tmem", "sharing", "hypervisor")
#: memd.nbd modules that are sans-I/O like memd.wire (memd.nbd.server is the I/O shell).
PURE_NBD = (
    "memd.nbd.proto",
    "memd.nbd.handshake",
    "memd.nbd.transmission",
    "memd.nbd.pages",
    "memd.nbd.export",
)
#: The migration stream codec is sans-I/O too (memd.migrate.transport and .qemu do the I/O).
PURE_MIGRATE = ("memd.migrate.proto",)
IO_MODULES = {
    "socket",
    "asyncio",
    "subprocess",
    "selectors",
    "libvirt",
    "libvirt_qemu",
    "qemu",
    "mmap",
    "threading_io",
    "lmdb",
    "fcntl",
}

# package prefix -> project modules it may import (by prefix)
ALLOWED = {
    "memd.errors": (),
    "memd.vocab": (),
    "memd.paths": (),
    "memd.wire": ("memd.errors", "memd.vocab", "memd.wire"),
    "memd.guest": ("memd.errors", "memd.vocab", "memd.wire", "memd.guest"),
    # The NBD server: its codec and export sit beside tmem; only memd.nbd.server does I/O.
    "memd.nbd": ("memd.errors", "memd.vocab", "memd.paths", "memd.nbd", "tmem"),
    "tmem": ("memd.errors", "memd.vocab", "tmem"),
    "sharing": ("memd.errors", "memd.vocab", "sharing"),
    # No memd.wire: sharing backends raise memd.errors; only the agent maps statuses.
    "hypervisor": ("memd.errors", "memd.vocab", "memd.paths", "tmem", "sharing", "hypervisor"),
    # Migration between agents: codec, TLS sessions, QEMU driver; below the agent.
    "memd.migrate.proto": ("memd.errors", "memd.vocab"),
    "memd.migrate": (
        "memd.errors",
        "memd.vocab",
        "memd.paths",
        "memd.migrate",
        "tmem",
        "hypervisor",
    ),
    "memd.agent": (
        "memd.errors",
        "memd.vocab",
        "memd.paths",
        "memd.wire",
        "memd.agent",
        "memd.nbd",
        "memd.migrate",
        "tmem",
        "sharing",
        "hypervisor",
    ),
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PROJECT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(p for p in rel.parts if p != "__init__")
            out.append((name, path))
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module in PROJECT:  # `from memd import paths` imports memd.paths
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _rule(module: str) -> tuple[str, ...] | None:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return ALLOWED[prefix]
    return None


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    allowed = _rule(module)
    if allowed is None:
        return  # top layer (memd.cli, memd.demo, ...) may import anything below it
    for name in _imports(path):
        if name.split(".")[0] in PROJECT and name != "memd":
            assert any(name == a or name.startswith(a + ".") for a in allowed), (
                f"{module} imports {name}: against the layering"
            )
        if (
            module.split(".")[0] in ("tmem", "sharing")
            or module.startswith("memd.wire")
            or module in PURE_NBD
            or module in PURE_MIGRATE
        ):
            assert name.split(".")[0] not in IO_MODULES, f"{module} (pure) imports {name}"
