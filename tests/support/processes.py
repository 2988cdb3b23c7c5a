"""Stopping a test's subprocess: SIGTERM, and SIGKILL if it has not exited in time."""

from __future__ import annotations

import subprocess


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Stop ``process`` (None, or one already exited: nothing to do) and reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
