"""The memd-guest command line against a fake host on a real unix socket, and the promise
that the guest side imports nothing python3-minimal lacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memd.guest.cli import main
from memd.wire import PAGE_SIZE
from tests.support.fakehost import FakeHostServer

# Top-level standard-library modules of Debian 12's python3.11-minimal +
# libpython3.11-minimal (from `dpkg -c`, plus the interpreter's built-in modules).
# Notably absent: dataclasses, json, uuid, secrets, shutil, tty/termios.
_MINIMAL_NAMES = """
__future__ _abc _ast _bisect _blake2 _codecs _collections _collections_abc _compat_pickle
_csv _datetime _elementtree _functools _hashlib _heapq _imp _io _locale _md5 _opcode _operator
_pickle _posixsubprocess _py_abc _random _sha1 _sha256 _sha3 _sha512 _signal _sitebuiltins
_socket _sre _ssl _stat _statistics _string _strptime _struct _symtable _thread
_threading_local _tokenize _tracemalloc _warnings _weakref _weakrefset abc argparse array ast
atexit base64 binascii bisect builtins calendar cmath codecs collections compileall
configparser contextlib copy copyreg csv datetime dis email encodings enum errno faulthandler
fcntl filecmp fnmatch functools gc genericpath getopt glob grp hashlib heapq imp importlib
inspect io ipaddress itertools keyword linecache locale logging marshal math opcode operator
optparse os pathlib pickle pkgutil platform posix posixpath py_compile pwd pyexpat quopri
random re reprlib runpy select selectors signal site sitecustomize socket spwd sre_compile
sre_constants sre_parse ssl stat string stringprep struct subprocess symtable sys sysconfig
syslog tempfile textwrap threading time token tokenize traceback tracemalloc types typing
unicodedata urllib uu warnings weakref xxsubtype zipfile zipimport zlib
"""
MINIMAL_STDLIB = frozenset(_MINIMAL_NAMES.split())
# Imported by the full interpreter but optional where they are missing: Debian's minimal
# argparse falls back without gettext, typing without _typing; the rest are the importer.
OPTIONAL = frozenset({"gettext", "_typing", "_frozen_importlib", "_frozen_importlib_external"})


def test_guest_side_imports_only_python3_minimal_modules() -> None:
    code = (
        "import sys, memd.guest.cli, memd.guest, memd.wire; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    stdlib = set(out.stdout.split()) & set(sys.stdlib_module_names)
    assert stdlib <= MINIMAL_STDLIB | OPTIONAL, stdlib - MINIMAL_STDLIB - OPTIONAL
    assert {m for m in out.stdout.split() if m not in sys.stdlib_module_names} <= {
        "memd",
        "__main__",
    }


@pytest.fixture
def server(tmp_path: Path) -> object:
    with FakeHostServer(str(tmp_path / "memd.sock")) as s:
        yield s


def run(
    server: FakeHostServer, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    code = main(["--socket", server.path, "--reconnect-timeout", "2", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_commands(
    server: FakeHostServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(server, capsys, "hello")
    assert code == 0 and "version=1\n" in out and f"page_size={PAGE_SIZE}" in out
    code, out, _ = run(server, capsys, "new-pool", "--persistent")
    assert code == 0 and out.strip().isdigit()
    pool = out.strip()
    src = tmp_path / "page.in"
    src.write_bytes(b"hello page")
    assert run(server, capsys, "put", pool, "0x10", "3", str(src))[0] == 0
    dst = tmp_path / "page.out"
    assert run(server, capsys, "get", pool, "16", "3", "-o", str(dst))[0] == 0
    assert dst.read_bytes() == b"hello page".ljust(PAGE_SIZE, b"\0")
    code, out, _ = run(server, capsys, "get", pool, "16:0:0", "3", "--hex")
    assert code == 0 and out.startswith(b"hello page".hex())
    assert run(server, capsys, "pools")[1] == f"{pool} persistent - 1\n"
    code, out, _ = run(server, capsys, "stats")
    assert "persistent_pages=1\n" in out and "client=guest\n" in out
    assert run(server, capsys, "flush", pool, "16", "3")[0] == 0
    code, _, err = run(server, capsys, "get", pool, "16", "3")
    assert code == 1 and "no page" in err
    assert run(server, capsys, "flush", pool, "16")[0] == 0
    code, out, _ = run(server, capsys, "nominate", "5", "0x6")
    assert code == 0 and re.fullmatch(r"0x5 ok [1-9]\d*\n0x6 ok [1-9]\d*\n", out), out
    assert run(server, capsys, "about-to-write", "5")[0] == 0
    assert run(server, capsys, "query", "5", "6")[1] == "0x5 private 1\n0x6 nominated 1\n"
    assert run(server, capsys, "destroy-pool", pool)[0] == 0


def test_cli_errors_are_one_sentence(
    server: FakeHostServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(server, capsys, "destroy-pool", "42")
    assert code == 2 and err.startswith("memd-guest: DESTROY_POOL:") and err.count("\n") == 1
    big = tmp_path / "big"
    big.write_bytes(bytes(PAGE_SIZE + 1))
    code, _, err = run(server, capsys, "put", "1", "1", "1", str(big))
    assert code == 2 and "at most 4096" in err
    with pytest.raises(SystemExit):
        main(["get", "1", "not-an-oid", "0"])
    code = main(["--socket", str(tmp_path / "nothing"), "--reconnect-timeout", "0.1", "pools"])
    assert code == 2 and "cannot reach" in capsys.readouterr().err


def test_python_m_memd_guest(server: FakeHostServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memd.guest", "--socket", server.path, "new-pool"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stderr
