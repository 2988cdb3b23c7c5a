"""Running a piece of a test as another user, to see what memd tells that user."""

from __future__ import annotations

import os
from collections.abc import Callable

from memd.errors import MemdError

NOBODY = 65534


def as_nobody(action: Callable[[], str]) -> str:
    """Fork, become ``nobody`` in the child, run ``action`` there; return what it returned,
    or ``"ErrorClass: message"`` for the MemdError it raised (root only)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            message = action()
        except MemdError as err:
            message = f"{type(err).__name__}: {err}"
        except BaseException as err:  # reported to the parent, which fails the test
            message = f"unexpected {err!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message
