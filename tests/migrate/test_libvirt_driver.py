"""memd.migrate.libvirt's driver with two real agents in one process (TLS on 127.0.0.1)
and a scripted libvirt domain: the events and job looks libvirt gives during a
migration, in the orders it gives them, and what each leaves on both agents."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from hypervisor.guests import JobState, LifecycleEvent
from memd.agent.app import AgentApp
from memd.errors import InvalidArgument, MigrationFailed
from memd.migrate import libvirt
from tests.migrate.test_transport import agent, clean, dest_of, holds, page, populate, run
from tests.support.tls import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class ScriptedDomain:
    """What libvirt would say about the domain, set by the test (memd.migrate.libvirt.Domain)."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[LifecycleEvent] = asyncio.Queue()
        self.look = JobState("running", False)
        self.aborted_jobs = 0
        self.closed = False

    def emit(self, kind: str, detail: str) -> None:
        self.events.put_nowait(LifecycleEvent("vm1", "uuid", kind, detail))

    async def job(self) -> JobState:
        return self.look

    async def abort_job(self) -> bool:
        self.aborted_jobs += 1
        self.look = JobState("running", False)
        return True

    async def close(self) -> None:
        self.closed = True


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def phase_out(app: AgentApp) -> str | None:
    transfer = app.migration.outgoing.get("vm1")
    return None if transfer is None else transfer.progress.phase


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirt, "POLL_SECONDS", 0.02)


def test_a_libvirt_migration_moves_the_guest_and_changes_made_meanwhile(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            armed = await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            assert armed["outcome"] == "armed" and armed["pages"] >= len(want)
            domain.look = JobState("running", True)  # virsh migrate --live
            for i in range(40):  # the guest keeps putting while libvirt copies RAM
                want[(1, (1, 0, 0), 10_000 + i)] = page(1000 + i)
                src.tmem.put("vm1", 1, (1, 0, 0), 10_000 + i, page(1000 + i))
            await asyncio.sleep(0.3)
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: phase_out(src) == "confirmed")
            assert holds(dst, want) and holds(src, want)  # the source keeps it until moved
            domain.look = JobState("shut off", False)
            domain.emit("stopped", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert not src.tmem.has_client("vm1") and src.tmem.store_stats().pages == 0
            assert holds(dst, want) and clean(src) and clean(dst)
            assert domain.closed and domain.aborted_jobs == 0
            assert src.migration.status()["finished"][-1]["phase"] == "done"
            await until(lambda: bool(dst.migration.status()["finished"]))
            assert dst.migration.status()["finished"][-1]["phase"] == "done"

    run(main())


class SlowLooks(ScriptedDomain):
    """A look takes a while, as libvirt's call does in its worker thread: what it says
    is the domain as it was when the call began."""

    async def job(self) -> JobState:
        look = self.look
        await asyncio.sleep(0.1)
        return look


def test_a_look_begun_before_the_pause_and_answered_after_it_is_ignored(
    tmp_path: Path, pki: Path
) -> None:
    """It said "running, no job" (libvirt's job began and QEMU paused within one poll):
    taken for a failed migration, it aborted the move."""

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = SlowLooks()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            await asyncio.sleep(0.05)  # a look of "running, no job" is under way
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: phase_out(src) in ("confirmed", "aborted", None))
            await asyncio.sleep(0.3)  # the stale look has come back meanwhile
            assert phase_out(src) == "confirmed"
            domain.look = JobState("shut off", False)
            domain.emit("stopped", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(dst, want) and not src.tmem.has_client("vm1")

    run(main())


def test_libvirt_switching_over_before_memd_confirmed_still_moves_the_guest(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.emit("suspended", "migrated")
            domain.look = JobState("shut off", False)
            domain.emit("stopped", "migrated")  # at once: before CONFIRM can arrive
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(dst, want) and not src.tmem.has_client("vm1")
            assert clean(src) and clean(dst)

    run(main())


def test_a_migration_libvirt_gives_up_before_switch_over_leaves_the_guest_here(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.look = JobState("running", True)
            await asyncio.sleep(0.1)
            domain.look = JobState("running", False)  # virsh domjobabort, or it failed
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(src, want) and clean(src)
            await until(lambda: dst.tmem.client_names() == [])
            assert clean(dst) and domain.aborted_jobs == 0
            assert src.migration.status()["finished"][-1]["phase"] == "aborted"

    run(main())


def test_libvirt_resuming_the_guest_after_confirm_revokes_it_on_the_destination(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: phase_out(src) == "confirmed")
            assert dst.tmem.has_client("vm1")
            domain.emit("resumed", "migrated")  # libvirt's Finish failed on the destination
            await until(lambda: "vm1" not in src.migration.outgoing)
            await until(lambda: not dst.tmem.has_client("vm1"))
            assert holds(src, want) and clean(src) and clean(dst)
            await until(lambda: bool(dst.migration.status()["finished"]))
            assert dst.migration.status()["finished"][-1]["phase"] == "revoked"

    run(main())


def test_a_destination_agent_gone_at_switch_over_cancels_libvirts_migration(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with agent(tmp_path, "src", pki) as src:
            want = populate(src)
            domain = ScriptedDomain()
            async with agent(tmp_path, "dst", pki, listen=True) as dst:
                await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
                domain.look = JobState("running", True)
                await dst.migration.close()  # the destination agent goes away
                assert dst.tmem.client_names() == []
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert domain.aborted_jobs == 1  # the guest must not run where its pages are not
            assert holds(src, want) and clean(src)
            assert src.migration.status()["finished"][-1]["phase"] == "aborted"

    run(main())


def test_a_destination_without_room_fails_memd_migrate_and_cancels_libvirt(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True, budget=1 << 20) as dst,
        ):
            want = populate(src, 2000, noise=True)
            domain = ScriptedDomain()
            with pytest.raises(MigrationFailed, match="cannot take"):
                await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            assert domain.aborted_jobs == 1 and domain.closed
            assert holds(src, want) and clean(src)
            await until(lambda: dst.tmem.client_names() == [])

    run(main())


def test_memd_migrate_follows_a_domain_libvirt_runs_and_moves_others_by_hand(
    tmp_path: Path, pki: Path
) -> None:
    """The command's choice, and LibvirtDomain on a real libvirt connection (libvirt's
    test driver: events, no jobs): a running domain is followed (its destruction here
    aborts), a shut-off one is moved at once."""
    pytest.importorskip("libvirt")
    from hypervisor.libvirt_host import LibvirtHost
    from memd.agent.commands import MigrateArgs

    uri = "test:///default"
    xml = (
        "<domain type='test'><name>vm1</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )

    async def main() -> None:
        host = await asyncio.to_thread(LibvirtHost, uri)
        dom = host._conn.defineXML(xml)
        try:
            async with (
                agent(tmp_path, "src", pki) as src,
                agent(tmp_path, "dst", pki, listen=True) as dst,
            ):
                src.migration.libvirt_uri = uri  # = memd serve --libvirt URI
                want = populate(src)
                await asyncio.to_thread(dom.create)
                args = MigrateArgs(guest="vm1", to=dest_of(dst))
                armed = await src.migration.migrate_command(args)
                assert armed["outcome"] == "armed"
                await asyncio.to_thread(dom.suspend)  # an operator's pause: nothing
                await asyncio.to_thread(dom.resume)
                await asyncio.sleep(0.3)
                assert "vm1" in src.migration.outgoing
                await asyncio.to_thread(dom.destroy)  # the guest died here: ABORT
                await until(lambda: "vm1" not in src.migration.outgoing)
                assert holds(src, want) and clean(src)
                await until(lambda: dst.tmem.client_names() == [])
                assert src.migration.status()["finished"][-1]["phase"] == "aborted"
                moved = await src.migration.migrate_command(args)  # shut off: by hand
                assert moved["outcome"] == "moved" and holds(dst, want)
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            host.close()

    run(main())


def test_an_armed_transfer_whose_libvirt_migration_never_starts_gives_up_at_the_deadline(
    tmp_path: Path, pki: Path
) -> None:
    """A ``virsh migrate`` refused at Prepare (the destination's hook) or failing at once
    leaves no trace libvirt reports on the source: memd must not stay armed forever."""

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()  # running, no job: libvirt's migration failed unseen
            armed = await src.migration.follow_libvirt("vm1", dest_of(dst), domain, arm_seconds=0.3)
            assert armed["outcome"] == "armed"
            await until(lambda: "vm1" not in src.migration.outgoing)
            finished = src.migration.status()["finished"][-1]
            assert finished["phase"] == "aborted", finished
            assert "no libvirt migration of vm1 began within 0.3 s" in finished["error"]
            assert holds(src, want) and clean(src) and domain.aborted_jobs == 0
            await until(lambda: dst.tmem.client_names() == [])
            assert clean(dst) and domain.closed

    run(main())


def test_a_libvirt_migration_seen_before_the_deadline_is_followed_past_it(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain, arm_seconds=0.3)
            domain.look = JobState("running", True)  # a retried virsh migrate, in time
            await asyncio.sleep(0.6)
            assert phase_out(src) in ("precopy", "converged")
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: phase_out(src) == "confirmed")
            domain.look = JobState("gone", False)
            domain.emit("stopped", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(dst, want) and not src.tmem.has_client("vm1")
            assert clean(src) and clean(dst)

    run(main())


def test_memd_migrate_cancel_stops_memds_transfer_and_libvirts_migration(
    tmp_path: Path, pki: Path
) -> None:
    from memd.agent.commands import CancelMigrationArgs

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.look = JobState("running", True)  # libvirt copies RAM
            await until(lambda: phase_out(src) == "precopy")  # keeping b up to date
            await asyncio.sleep(0.1)
            done = await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))
            assert done["outcome"] == "aborted", done
            assert "cancelled by the operator" in done["error"]
            # The guest must not run where its pages are not: libvirt's migration goes too.
            assert domain.aborted_jobs == 1
            assert "vm1" not in src.migration.outgoing
            assert holds(src, want) and clean(src)
            await until(lambda: dst.tmem.client_names() == [])
            assert clean(dst)
            with pytest.raises(InvalidArgument, match=r"^no outgoing transfer of vm1 runs"):
                await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))

    run(main())


def test_memd_migrate_cancel_is_refused_once_the_final_delta_is_installed(
    tmp_path: Path, pki: Path
) -> None:
    from memd.agent.commands import CancelMigrationArgs

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            want = populate(src)
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.look = JobState("paused", True)
            domain.emit("suspended", "migrated")
            await until(lambda: phase_out(src) == "confirmed")
            with pytest.raises(InvalidArgument, match=r"^too late to cancel the transfer of vm1"):
                await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))
            domain.look = JobState("gone", False)
            domain.emit("stopped", "migrated")  # libvirt finishes it
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(dst, want) and clean(src) and clean(dst)

    run(main())


def _switch_over(domain: ScriptedDomain) -> None:
    domain.look = JobState("paused", True)
    domain.emit("suspended", "migrated")


def test_a_followed_guest_that_holds_nothing_yet_moves_as_an_empty_client(
    tmp_path: Path, pki: Path
) -> None:
    """A memd guest that has not said HELLO: the destination's hook needs a transfer, so
    one runs, empty; the guest's first HELLO on the destination is a first contact."""

    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            domain = ScriptedDomain()
            armed = await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            assert armed["outcome"] == "armed" and armed["pages"] == 0
            await until(lambda: "vm1" in dst.migration.incoming)  # what the hook asks
            _switch_over(domain)
            await until(lambda: phase_out(src) == "confirmed")
            domain.look = JobState("gone", False)
            domain.emit("stopped", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert src.migration.status()["finished"][-1]["phase"] == "done"
            assert not src.tmem.has_client("vm1")
            assert dst.tmem.has_client("vm1") and dst.tmem.pool_ids("vm1") == []
            assert "boot_id" not in dst.tmem.client_meta("vm1")
            state = dst.agent.guests.get("vm1")
            assert state is None or state.boot_id is None  # no reboot at its first HELLO
            assert clean(src) and clean(dst)

    run(main())


def test_an_empty_guest_that_says_hello_while_armed_moves_with_what_it_put(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain)
            domain.look = JobState("running", True)
            want = populate(src)  # HELLO and puts, while libvirt copies RAM
            _switch_over(domain)
            await until(lambda: phase_out(src) == "confirmed")
            domain.look = JobState("gone", False)
            domain.emit("stopped", "migrated")
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert holds(dst, want) and not src.tmem.has_client("vm1")
            # BEGIN carried the settings of before its HELLO (no boot id): its next HELLO
            # on the destination is no reboot, so it keeps these pools.
            state = dst.agent.guests.get("vm1")
            assert state is None or state.boot_id is None
            assert clean(src) and clean(dst)

    run(main())


def test_an_empty_guests_aborted_migration_leaves_no_client_behind(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with (
            agent(tmp_path, "src", pki) as src,
            agent(tmp_path, "dst", pki, listen=True) as dst,
        ):
            domain = ScriptedDomain()
            await src.migration.follow_libvirt("vm1", dest_of(dst), domain, arm_seconds=0.2)
            await until(lambda: "vm1" not in src.migration.outgoing)
            assert src.migration.status()["finished"][-1]["phase"] == "aborted"
            await until(lambda: not src.tmem.has_client("vm1"))
            await until(lambda: dst.tmem.client_names() == [])
            assert clean(src) and clean(dst)

    run(main())
