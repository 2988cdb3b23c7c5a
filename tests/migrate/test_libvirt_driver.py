"""memd.migrate.libvirt's driver with two real agents in one process (TLS on 127.0.0.1)
and a scripted libvirt domain: the events and job looks libvirt gives during a
migration, in the orders it gives them, and what each leaves on both agents."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hypervisor.guests import JobState, LifecycleEvent
from memd.agent.app import AgentApp
from memd.agent.commands import CancelMigrationArgs
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

    # -- what libvirt does during a migration, in the tests' words --------------------------

    def copies(self) -> None:
        """``virsh migrate --live`` runs: libvirt's job copies RAM, the guest still runs."""
        self.look = JobState("running", True)

    def switch_over(self) -> None:
        """libvirt pauses the guest for its last copy (the source's "suspended" event)."""
        self.look = JobState("paused", True)
        self.emit("suspended", "migrated")

    def finish(self, look: str = "gone") -> None:
        """The guest runs on the destination: the source's domain stops ("stopped" event)."""
        self.look = JobState(look, False)
        self.emit("stopped", "migrated")


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def phase_out(app: AgentApp) -> str | None:
    transfer = app.migration.outgoing.get("vm1")
    return None if transfer is None else transfer.progress.phase


def last_phase(app: AgentApp) -> Any:
    """The phase of the agent's last finished transfer."""
    return app.migration.status()["finished"][-1]["phase"]


async def confirmed(src: AgentApp) -> None:
    await until(lambda: phase_out(src) == "confirmed")


async def outgoing_over(src: AgentApp) -> None:
    await until(lambda: "vm1" not in src.migration.outgoing)


async def dropped(dst: AgentApp) -> None:
    """Until the destination holds no client (what it had staged is dropped)."""
    await until(lambda: dst.tmem.client_names() == [])


async def incoming_finished(dst: AgentApp) -> Any:
    """Until the destination has finished a transfer; its phase."""
    await until(lambda: bool(dst.migration.status()["finished"]))
    return last_phase(dst)


Scenario = Callable[[AgentApp, AgentApp], Awaitable[None]]


def with_two_agents(*, dst_budget: int = 0) -> Callable[[Scenario], Callable[[Path, Path], None]]:
    """Make ``scenario(src, dst)`` a test: it runs with a source agent and a listening
    destination agent (``dst_budget``: the destination's budget in bytes, 0 for the default).
    The test keeps the scenario's name and docstring."""
    budget = {"budget": dst_budget} if dst_budget else {}

    def make_test(scenario: Scenario) -> Callable[[Path, Path], None]:
        def test(tmp_path: Path, pki: Path) -> None:
            async def main() -> None:
                async with (
                    agent(tmp_path, "src", pki) as src,
                    agent(tmp_path, "dst", pki, listen=True, **budget) as dst,
                ):
                    await scenario(src, dst)

            run(main())

        # Not functools.wraps: pytest would read the scenario's parameters as fixtures.
        test.__name__ = test.__qualname__ = scenario.__name__
        test.__doc__ = scenario.__doc__
        return test

    return make_test


async def follow(
    src: AgentApp, dst: AgentApp, domain: ScriptedDomain, **options: Any
) -> dict[str, Any]:
    """``memd migrate vm1 --to DST`` following ``domain``: the command's answer."""
    return await src.migration.follow_libvirt("vm1", dest_of(dst), domain, **options)


Pages = dict[tuple[int, tuple[int, int, int], int], bytes]


async def populate_and_follow(
    src: AgentApp, dst: AgentApp, domain: ScriptedDomain | None = None, **options: Any
) -> tuple[Pages, ScriptedDomain]:
    """vm1 holds pages on the source (what it holds: the first value) and memd follows
    ``domain`` (a fresh ScriptedDomain by default: the second value) to the destination."""
    want = populate(src)
    domain = ScriptedDomain() if domain is None else domain
    await follow(src, dst, domain, **options)
    return want, domain


async def switched_over(domain: ScriptedDomain, src: AgentApp) -> None:
    """libvirt switches over, and memd's final delta is installed on the destination."""
    domain.switch_over()
    await confirmed(src)


async def libvirt_finishes(domain: ScriptedDomain, src: AgentApp, look: str = "gone") -> None:
    """The source's domain stops (the guest runs on the destination); memd's transfer ends."""
    domain.finish(look)
    await outgoing_over(src)


@pytest.fixture(autouse=True)
def _quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libvirt, "POLL_SECONDS", 0.02)


@with_two_agents()
async def test_a_libvirt_migration_moves_the_guest_and_changes_made_meanwhile(
    src: AgentApp, dst: AgentApp
) -> None:
    want = populate(src)
    domain = ScriptedDomain()
    armed = await follow(src, dst, domain)
    assert armed["outcome"] == "armed" and armed["pages"] >= len(want)
    domain.copies()  # virsh migrate --live
    for i in range(40):  # the guest keeps putting while libvirt copies RAM
        want[(1, (1, 0, 0), 10_000 + i)] = page(1000 + i)
        src.tmem.put("vm1", 1, (1, 0, 0), 10_000 + i, page(1000 + i))
    await asyncio.sleep(0.3)
    await switched_over(domain, src)
    assert holds(dst, want) and holds(src, want)  # the source keeps it until moved
    await libvirt_finishes(domain, src, "shut off")
    assert not src.tmem.has_client("vm1") and src.tmem.store_stats().pages == 0
    assert holds(dst, want) and clean(src) and clean(dst)
    assert domain.closed and domain.aborted_jobs == 0
    assert last_phase(src) == "done"
    assert await incoming_finished(dst) == "done"


class SlowLooks(ScriptedDomain):
    """A look takes a while, as libvirt's call does in its worker thread: what it says
    is the domain as it was when the call began."""

    async def job(self) -> JobState:
        look = self.look
        await asyncio.sleep(0.1)
        return look


@with_two_agents()
async def test_a_look_begun_before_the_pause_and_answered_after_it_is_ignored(
    src: AgentApp, dst: AgentApp
) -> None:
    """It said "running, no job" (libvirt's job began and QEMU paused within one poll):
    taken for a failed migration, it aborted the move."""
    want, domain = await populate_and_follow(src, dst, SlowLooks())
    await asyncio.sleep(0.05)  # a look of "running, no job" is under way
    domain.switch_over()
    await until(lambda: phase_out(src) in ("confirmed", "aborted", None))
    await asyncio.sleep(0.3)  # the stale look has come back meanwhile
    assert phase_out(src) == "confirmed"
    await libvirt_finishes(domain, src, "shut off")
    assert holds(dst, want) and not src.tmem.has_client("vm1")


@with_two_agents()
async def test_libvirt_switching_over_before_memd_confirmed_still_moves_the_guest(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst)
    domain.emit("suspended", "migrated")
    await libvirt_finishes(domain, src, "shut off")  # at once: before CONFIRM can arrive
    assert holds(dst, want) and not src.tmem.has_client("vm1")
    assert clean(src) and clean(dst)


@with_two_agents()
async def test_a_migration_libvirt_gives_up_before_switch_over_leaves_the_guest_here(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst)
    domain.copies()
    await asyncio.sleep(0.1)
    domain.look = JobState("running", False)  # virsh domjobabort, or it failed
    await outgoing_over(src)
    assert holds(src, want) and clean(src)
    await dropped(dst)
    assert clean(dst) and domain.aborted_jobs == 0
    assert last_phase(src) == "aborted"


@with_two_agents()
async def test_libvirt_resuming_the_guest_after_confirm_revokes_it_on_the_destination(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst)
    await switched_over(domain, src)
    assert dst.tmem.has_client("vm1")
    domain.emit("resumed", "migrated")  # libvirt's Finish failed on the destination
    await outgoing_over(src)
    await until(lambda: not dst.tmem.has_client("vm1"))
    assert holds(src, want) and clean(src) and clean(dst)
    assert await incoming_finished(dst) == "revoked"


def test_a_destination_agent_gone_at_switch_over_cancels_libvirts_migration(
    tmp_path: Path, pki: Path
) -> None:
    async def main() -> None:
        async with agent(tmp_path, "src", pki) as src:
            want = populate(src)
            domain = ScriptedDomain()
            async with agent(tmp_path, "dst", pki, listen=True) as dst:
                await follow(src, dst, domain)
                domain.copies()
                await dst.migration.close()  # the destination agent goes away
                assert dst.tmem.client_names() == []
            domain.switch_over()
            await outgoing_over(src)
            assert domain.aborted_jobs == 1  # the guest must not run where its pages are not
            assert holds(src, want) and clean(src)
            assert last_phase(src) == "aborted"

    run(main())


@with_two_agents(dst_budget=1 << 20)
async def test_a_destination_without_room_fails_memd_migrate_and_cancels_libvirt(
    src: AgentApp, dst: AgentApp
) -> None:
    want = populate(src, 2000, noise=True)
    domain = ScriptedDomain()
    with pytest.raises(MigrationFailed, match="cannot take"):
        await follow(src, dst, domain)
    assert domain.aborted_jobs == 1 and domain.closed
    assert holds(src, want) and clean(src)
    await dropped(dst)


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
                await outgoing_over(src)
                assert holds(src, want) and clean(src)
                await dropped(dst)
                assert last_phase(src) == "aborted"
                moved = await src.migration.migrate_command(args)  # shut off: by hand
                assert moved["outcome"] == "moved" and holds(dst, want)
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            host.close()

    run(main())


@with_two_agents()
async def test_an_armed_transfer_whose_libvirt_migration_never_starts_gives_up_at_the_deadline(
    src: AgentApp, dst: AgentApp
) -> None:
    """A ``virsh migrate`` refused at Prepare (the destination's hook) or failing at once
    leaves no trace libvirt reports on the source: memd must not stay armed forever."""
    want = populate(src)
    domain = ScriptedDomain()  # running, no job: libvirt's migration failed unseen
    armed = await follow(src, dst, domain, arm_seconds=0.3)
    assert armed["outcome"] == "armed"
    await outgoing_over(src)
    finished = src.migration.status()["finished"][-1]
    assert finished["phase"] == "aborted", finished
    assert "no libvirt migration of vm1 began within 0.3 s" in finished["error"]
    assert holds(src, want) and clean(src) and domain.aborted_jobs == 0
    await dropped(dst)
    assert clean(dst) and domain.closed


@with_two_agents()
async def test_a_libvirt_migration_seen_before_the_deadline_is_followed_past_it(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst, arm_seconds=0.3)
    domain.copies()  # a retried virsh migrate, in time
    await asyncio.sleep(0.6)
    assert phase_out(src) in ("precopy", "converged")
    await switched_over(domain, src)
    await libvirt_finishes(domain, src)
    assert holds(dst, want) and not src.tmem.has_client("vm1")
    assert clean(src) and clean(dst)


@with_two_agents()
async def test_memd_migrate_cancel_stops_memds_transfer_and_libvirts_migration(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst)
    domain.copies()  # libvirt copies RAM
    await until(lambda: phase_out(src) == "precopy")  # keeping b up to date
    await asyncio.sleep(0.1)
    done = await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))
    assert done["outcome"] == "aborted", done
    assert "cancelled by the operator" in done["error"]
    # The guest must not run where its pages are not: libvirt's migration goes too.
    assert domain.aborted_jobs == 1
    assert "vm1" not in src.migration.outgoing
    assert holds(src, want) and clean(src)
    await dropped(dst)
    assert clean(dst)
    with pytest.raises(InvalidArgument, match=r"^no outgoing transfer of vm1 runs"):
        await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))


@with_two_agents()
async def test_memd_migrate_cancel_is_refused_once_the_final_delta_is_installed(
    src: AgentApp, dst: AgentApp
) -> None:
    want, domain = await populate_and_follow(src, dst)
    await switched_over(domain, src)
    with pytest.raises(InvalidArgument, match=r"^too late to cancel the transfer of vm1"):
        await src.migration.cancel_command(CancelMigrationArgs(guest="vm1"))
    await libvirt_finishes(domain, src)  # libvirt finishes it
    assert holds(dst, want) and clean(src) and clean(dst)


@with_two_agents()
async def test_a_followed_guest_that_holds_nothing_yet_moves_as_an_empty_client(
    src: AgentApp, dst: AgentApp
) -> None:
    """A memd guest that has not said HELLO: the destination's hook needs a transfer, so
    one runs, empty; the guest's first HELLO on the destination is a first contact."""
    domain = ScriptedDomain()
    armed = await follow(src, dst, domain)
    assert armed["outcome"] == "armed" and armed["pages"] == 0
    await until(lambda: "vm1" in dst.migration.incoming)  # what the hook asks
    await switched_over(domain, src)
    await libvirt_finishes(domain, src)
    assert last_phase(src) == "done"
    assert not src.tmem.has_client("vm1")
    assert dst.tmem.has_client("vm1") and dst.tmem.pool_ids("vm1") == []
    assert "boot_id" not in dst.tmem.client_meta("vm1")
    state = dst.agent.guests.get("vm1")
    assert state is None or state.boot_id is None  # no reboot at its first HELLO
    assert clean(src) and clean(dst)


@with_two_agents()
async def test_an_empty_guest_that_says_hello_while_armed_moves_with_what_it_put(
    src: AgentApp, dst: AgentApp
) -> None:
    domain = ScriptedDomain()
    await follow(src, dst, domain)
    domain.copies()
    want = populate(src)  # HELLO and puts, while libvirt copies RAM
    await switched_over(domain, src)
    await libvirt_finishes(domain, src)
    assert holds(dst, want) and not src.tmem.has_client("vm1")
    # BEGIN carried the settings of before its HELLO (no boot id): its next HELLO
    # on the destination is no reboot, so it keeps these pools.
    state = dst.agent.guests.get("vm1")
    assert state is None or state.boot_id is None
    assert clean(src) and clean(dst)


@with_two_agents()
async def test_an_empty_guests_aborted_migration_leaves_no_client_behind(
    src: AgentApp, dst: AgentApp
) -> None:
    domain = ScriptedDomain()
    await follow(src, dst, domain, arm_seconds=0.2)
    await outgoing_over(src)
    assert last_phase(src) == "aborted"
    await until(lambda: not src.tmem.has_client("vm1"))
    await dropped(dst)
    assert clean(src) and clean(dst)
