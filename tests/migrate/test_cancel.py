"""``memd migrate VM --cancel`` of a by-hand transfer, against a destination that accepts
the TLS connection and never answers (the transfer waits in ``connecting``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from memd.agent.commands import CancelMigrationArgs
from memd.errors import MigrationFailed
from memd.migrate import tls
from tests.migrate.test_transport import agent, clean, holds, populate, run
from tests.support.tls import make_pki


def test_a_by_hand_transfer_waiting_for_its_destination_is_cancelled(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    async def main() -> None:
        async def silent(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)  # never READY

        server = await asyncio.start_server(
            silent, "127.0.0.1", 0, ssl=tls.server_context(pki), ssl_handshake_timeout=10
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with agent(tmp_path, "src", pki) as src:
                want = populate(src)
                moving = asyncio.ensure_future(src.migration.migrate("vm1", f"127.0.0.1:{port}"))
                async with asyncio.timeout(15):
                    while "vm1" not in src.migration.outgoing:
                        await asyncio.sleep(0.02)
                done = await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))
                assert done["outcome"] == "aborted", done
                with pytest.raises(MigrationFailed, match="cancelled by the operator"):
                    await moving
                assert "vm1" not in src.migration.outgoing
                assert holds(src, want) and clean(src)
        finally:
            server.close()

    run(main())
