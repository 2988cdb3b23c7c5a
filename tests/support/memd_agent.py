"""A ``memd serve`` that a test runs as a separate process, and the CLI that talks to it.

Shared by the simulated-host tests (tests.migrate.netns's namespace agents, the libvirt
test bed's per-host agents): the common ``serve`` command line, waiting until the agent
listens for migrations, the JSON CLI, stopping and the log's tail.  A subclass says how its
process is started (inside which namespaces) and where its control socket is seen from the
test process.

State: an agent belongs to the one test thread that made it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.processes import terminate

ROOT = Path(__file__).resolve().parents[2]


def serve_argv(socket: Path, store: Path, migrate_listen: str, tls: Path, *extra: str) -> list[str]:
    """``memd serve`` listening for migrations with mutual TLS, 512 MiB, no spill, debug JSON
    log; ``extra`` adds its guests (``--channel``/``--listen``, ``--swap``, ``--libvirt``)."""
    return [
        sys.executable,
        "-m",
        "memd.cli",
        "--socket",
        str(socket),
        "serve",
        "--store",
        str(store),
        "--budget",
        "512M",
        "--spill-dir",
        "",
        "--migrate-listen",
        migrate_listen,
        "--tls-dir",
        str(tls),
        *extra,
        "--log-json",
        "--log-level",
        "debug",
    ]


class AgentProcess:
    """One ``memd serve`` process; ``process`` is None while it is not running."""

    def __init__(self, log: Path, control_socket: Path, where: str) -> None:
        self.log = log
        #: The agent's control socket as the test process reaches it.
        self.control_socket = control_socket
        self.where = where  #: for messages: which host the agent runs in
        self.process: subprocess.Popen[bytes] | None = None

    def wait_listening(self, timeout: float) -> None:
        """Until ``memd status`` says the agent listens for migrations; fails with the log's
        tail if the agent exits first or the time runs out."""
        assert self.process is not None, f"the agent in {self.where} was not started"
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(subprocess.CalledProcessError, json.JSONDecodeError):
                if self.cli("status")["migrations"]["listening"]:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"agent in {self.where} did not start:\n{self.tail()}")
            time.sleep(0.1)

    def cli(self, *args: str, timeout: float = 300) -> Any:
        """``memd ARGS --json`` against this agent; its decoded output."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "memd.cli",
                "--socket",
                str(self.control_socket),
                *args,
                "--json",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return json.loads(out.stdout)

    def kill(self) -> None:
        """SIGKILL: the agent dies without any clean-up of its own."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        terminate(self.process, 20)
        self.process = None

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
