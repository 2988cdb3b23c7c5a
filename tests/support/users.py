"""Running a piece of a test as another user, to see what memd tells that user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter, not a fork: the test process has threads (an agent's event loop,
# libvirt's event loop), and a forked child inherits any lock one of them held at the
# fork (an import lock, a logging lock) and can wait on it forever.  The interpreter
# starts as root and imports what the action needs, then becomes nobody: the
# interpreter and its packages may live where nobody cannot read (e.g. under /root).
_RUNNER = """
import os, sys
from memd.errors import MemdError
namespace = {}
exec(sys.argv[1], namespace)
os.setgroups([])
os.setgid(NOBODY_UID)
os.setuid(NOBODY_UID)
try:
    exec(sys.argv[2], namespace)
    message = namespace["result"]
except MemdError as err:
    message = f"{type(err).__name__}: {err}"
except BaseException as err:
    message = f"unexpected {err!r}"
sys.stdout.write(str(message))
""".replace("NOBODY_UID", str(NOBODY))


def as_nobody(imports: str, action: str, *, timeout: float = 60.0) -> str:
    """Run ``imports`` as root, then ``action`` (Python that sets ``result``) as ``nobody``,
    in a new interpreter; return ``result``, or ``"ErrorClass: message"`` for the
    MemdError it raised (root only)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, imports, action],
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
