"""End to end: two libvirt TCG guests, a real ``memd serve --libvirt`` process, and
``memd-guest`` inside each guest talking over its real virtio-serial port.

The tests are the steps of one story on the same two guests and run in file order: private
pools round-trip every byte, flushes and isolation, a shared pool that only host authorisation
opens, a graceful agent restart both guests ride out, and a reboot that leaves one guest with
nothing stale while the other carries on.  Page contents are made on the host (seeded, one set
per guest plus one page both guests store), compared inside the guest with ``cmp`` and again on
the host after reading the fetched files back through the console.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass, field

import pytest

from .cluster import LibvirtGuest, Step, both, is_root
from .conftest import Cluster

pytestmark = [pytest.mark.vm, pytest.mark.libvirt]

PAGE = 4096
COMMON = random.Random(0xC0FFEE).randbytes(PAGE)  # stored by both guests
BIG_OID = "0xffffffffffffffff:0x1:0x8000000000000000"  # all three oid words in use
SHORT = 100  # a put of a short file is zero-padded to a page


@dataclass(frozen=True)
class Handle:
    pool: str  # "P" persistent, "E" ephemeral, "S" shared: resolved through Story.pools
    oid: str
    index: int


@dataclass
class Story:
    """What each guest stored: pool ids as the guest got them, and every page it may read."""

    pages: dict[str, list[bytes]]  # guest name -> its own random pages (files p0.. in the guest)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)
    held: dict[str, dict[Handle, bytes]] = field(default_factory=dict)  # pages that must be there
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))


@pytest.fixture(scope="module")
def story(cluster: Cluster) -> Story:
    pages = {
        g.name: [random.Random(f"{g.name}-{i}").randbytes(PAGE) for i in range(5)]
        for g in cluster.guests
    }
    return Story(pages)


def _cmd(story: Story, guest: LibvirtGuest, verb: str, handle: Handle, *extra: str) -> str:
    pool = story.pools[guest.name][handle.pool]
    return " ".join(["memd-guest", verb, str(pool), handle.oid, str(handle.index), *extra])


def _ok(results: dict[str, Step], guest: LibvirtGuest) -> None:
    failed = {label: str(step) for label, step in results.items() if step.rc != 0}
    assert not failed, f"{guest.name}: {failed}"


def _read_back(guest: LibvirtGuest, files: list[str]) -> bytes:
    return guest.check_bytes("cat " + " ".join(f"/tmp/{f}" for f in files))


def _pool_lines(output: str) -> dict[int, tuple[str, str, int]]:
    """``memd-guest pools`` (newlines shown as |): pool -> (kind, uuid, pages)."""
    pools = {}
    for line in filter(None, output.split("|")):
        pool, kind, uuid_hex, pages = line.split()
        pools[int(pool)] = (kind, uuid_hex, int(pages))
    return pools


def _host_pools(cluster: Cluster, guest: LibvirtGuest) -> dict[int, dict[str, object]]:
    return {row["pool_id"]: row for row in cluster.agent.json("pools", guest.name)}


def _verify_held(story: Story, guest: LibvirtGuest, tag: str) -> None:
    """Every page the guest must still hold comes back byte-exact (in the guest and here)."""
    held = list(story.held[guest.name].items())
    steps = [
        (f"{tag}{n}", _cmd(story, guest, "get", h, "-o", f"{tag}{n}"))
        for n, (h, _) in enumerate(held)
    ]
    _ok(guest.steps(steps), guest)
    assert _read_back(guest, [f"{tag}{n}" for n in range(len(held))]) == b"".join(
        data for _, data in held
    )


# ------------------------------------------------------------------------------------------


def test_agent_attaches_both_guests_through_libvirt(cluster: Cluster) -> None:
    rows = cluster.agent.guest_rows()
    for guest in cluster.guests:
        row = rows[guest.name]
        assert row["mode"] == "connect" and row["connected"], row
        assert row["path"] == guest.channel_path(), "the channel must come from the live XML"

    def hello(guest: LibvirtGuest) -> dict[str, Step]:
        return guest.steps(
            [
                ("ports", "memd-guest ports"),
                ("hello", "memd-guest hello"),
                ("pools", "memd-guest pools"),
            ]
        )

    for guest, results in zip(cluster.guests, both(cluster.a, cluster.b, hello), strict=True):
        _ok(results, guest)
        assert re.search(r"^org\.memd\.0 /dev/vport\d+p\d+", results["ports"].output)
        assert "version=1" in results["hello"].output
        assert "page_size=4096" in results["hello"].output
        assert results["pools"].output == ""
    rows = cluster.agent.guest_rows()
    assert all(rows[g.name]["boot_id"] for g in cluster.guests), rows
    if is_root():
        # The follower reads a guest's RAM before it connects the guest's channel, so the
        # daemon's HELLO at boot is already offered page sharing.
        assert all("sharing" in rows[g.name]["capabilities"] for g in cluster.guests), rows


def test_private_pools_round_trip_every_byte(cluster: Cluster, story: Story) -> None:
    def create(guest: LibvirtGuest) -> dict[str, Step]:
        own = story.pages[guest.name]
        guest.shell.write_file("/tmp/pages.bin", b"".join(own) + COMMON)
        split = " ".join(
            f"dd if=pages.bin of=p{i} bs={PAGE} skip={i} count=1 2>/dev/null &&"
            for i in range(len(own) + 1)
        )
        return guest.steps(
            [
                ("split", f"{split} head -c {SHORT} p3 > short"),
                ("P", "memd-guest new-pool --persistent"),
                ("E", "memd-guest new-pool"),
            ]
        )

    for guest, results in zip(cluster.guests, both(cluster.a, cluster.b, create), strict=True):
        _ok(results, guest)
        story.pools[guest.name] = {"P": int(results["P"].output), "E": int(results["E"].output)}
    assert all(len(set(p.values())) == 2 for p in story.pools.values()), story.pools

    def round_trip(guest: LibvirtGuest) -> tuple[dict[str, Step], bytes]:
        own = story.pages[guest.name]
        # handle -> (file to put, the page the host must give back)
        plan = {
            Handle("P", "1", 0): ("p0", own[0]),
            Handle("P", "1", 1): ("p1", own[1]),
            Handle("P", "2", 0): ("p5", COMMON),
            Handle("P", BIG_OID, 7): ("p2", own[2]),
            Handle("P", "3", 0): ("short", own[3][:SHORT].ljust(PAGE, b"\0")),
            Handle("E", "5", 3): ("p4", own[4]),
        }
        steps = [
            (f"put{n}", _cmd(story, guest, "put", h, src))
            for n, (h, (src, _)) in enumerate(plan.items())
        ]
        steps += [
            (f"get{n}", _cmd(story, guest, "get", h, "-o", f"g{n}")) for n, h in enumerate(plan)
        ]
        steps += [
            (f"cmp{n}", f"cmp {src} g{n}")
            for n, (src, _) in enumerate(plan.values())
            if src != "short"
        ]
        # A get from a private ephemeral pool is exclusive: the page has left the host.
        steps += [
            (f"again{n}", _cmd(story, guest, "get", h, "-o", "again"))
            for n, h in enumerate(plan)
            if h.pool == "E"
        ]
        steps += [("pools", "memd-guest pools")]
        results = guest.steps(steps)
        story.held[guest.name] = {h: data for h, (_, data) in plan.items() if h.pool == "P"}
        back = _read_back(guest, [f"g{n}" for n in range(len(plan))])
        assert back == b"".join(data for _, data in plan.values()), "bytes differ on the host"
        return results, back

    for guest, (results, _) in zip(
        cluster.guests, both(cluster.a, cluster.b, round_trip), strict=True
    ):
        again = {k: v for k, v in results.items() if k.startswith("again")}
        _ok({k: v for k, v in results.items() if k not in again}, guest)
        assert again and all(step.rc == 1 for step in again.values()), again
        pools = story.pools[guest.name]
        assert _pool_lines(results["pools"].output) == {
            pools["P"]: ("persistent", "-", 5),
            pools["E"]: ("ephemeral", "-", 0),
        }
        host = _host_pools(cluster, guest)
        assert {p: (r["kind"], r["shared"], r["pages"]) for p, r in host.items()} == {
            pools["P"]: ("persistent", False, 5),
            pools["E"]: ("ephemeral", False, 0),
        }


def test_flushes_and_isolation(cluster: Cluster, story: Story) -> None:
    a, b = cluster.a, cluster.b
    # A flushes one page and the object B stores too; B flushes a whole object of its own.
    steps = {
        a: [
            ("page", _cmd(story, a, "flush", Handle("P", "1", 1))),
            ("object", f"memd-guest flush {story.pools[a.name]['P']} 2"),
            ("gone-page", _cmd(story, a, "get", Handle("P", "1", 1), "-o", "x")),
            ("gone-object", _cmd(story, a, "get", Handle("P", "2", 0), "-o", "x")),
        ],
        b: [
            ("object", f"memd-guest flush {story.pools[b.name]['P']} 1"),
            ("gone0", _cmd(story, b, "get", Handle("P", "1", 0), "-o", "x")),
            ("gone1", _cmd(story, b, "get", Handle("P", "1", 1), "-o", "x")),
            # Pool ids are per guest: one this guest never created does not exist for it.
            ("foreign-get", "memd-guest get 17 1 0 -o x"),
            ("foreign-put", "memd-guest put 17 1 0 p0"),
            ("foreign-destroy", "memd-guest destroy-pool 17"),
        ],
    }
    flush_a, flush_b = both(a, b, lambda g: g.steps(steps[g]))
    assert [flush_a[k].rc for k in ("page", "object", "gone-page", "gone-object")] == [
        0,
        0,
        1,
        1,
    ], flush_a
    del story.held[a.name][Handle("P", "1", 1)], story.held[a.name][Handle("P", "2", 0)]
    assert [flush_b[k].rc for k in ("object", "gone0", "gone1")] == [0, 1, 1], flush_b
    for label in ("foreign-get", "foreign-put", "foreign-destroy"):
        assert flush_b[label].rc == 2 and "pool 17 does not exist" in flush_b[label].output, flush_b
    del story.held[b.name][Handle("P", "1", 0)], story.held[b.name][Handle("P", "1", 1)]

    # What each flushed is gone for it alone: COMMON is still B's, A's object 1 still A's.
    both(a, b, lambda g: _verify_held(story, g, "h"))
    for guest in cluster.guests:
        host = _host_pools(cluster, guest)
        assert host[story.pools[guest.name]["P"]]["pages"] == len(story.held[guest.name]) == 3


def test_shared_pool_opens_only_after_host_authorisation(cluster: Cluster, story: Story) -> None:
    a, b, agent = cluster.a, cluster.b, cluster.agent
    denied = a.steps(
        [("join", f"memd-guest new-pool --shared-uuid {story.uuid}"), ("pools", "memd-guest pools")]
    )
    assert denied["join"].rc == 2, denied
    assert "not authorised" in denied["join"].output, denied
    # Refused means no pool at all, not a private one in its place.
    assert len(_pool_lines(denied["pools"].output)) == 2, denied
    assert not any(r["shared"] for r in _host_pools(cluster, a).values())

    for guest in cluster.guests:
        proc = agent.cli("authorize", guest.name, story.uuid)
        assert proc.returncode == 0, proc.stderr
        assert story.uuid in proc.stdout

    joined_a = a.steps(
        [
            ("S", f"memd-guest new-pool --shared-uuid {story.uuid}"),
            ("other", f"memd-guest new-pool --shared-uuid {uuid.uuid4()}"),
        ]
    )
    assert joined_a["S"].rc == 0 and joined_a["other"].rc == 2, joined_a
    story.pools[a.name]["S"] = int(joined_a["S"].output)
    _ok(a.steps([("put", _cmd(story, a, "put", Handle("S", "7", 0), "p0"))]), a)

    joined_b = b.steps([("S", f"memd-guest new-pool --shared-uuid {story.uuid}")])
    _ok(joined_b, b)
    story.pools[b.name]["S"] = int(joined_b["S"].output)
    _ok(
        b.steps(
            [
                ("get", _cmd(story, b, "get", Handle("S", "7", 0), "-o", "s0")),
                ("put", _cmd(story, b, "put", Handle("S", "7", 1), "p1")),
            ]
        ),
        b,
    )
    assert _read_back(b, ["s0"]) == story.pages[a.name][0], "B must read what A put"
    _ok(a.steps([("get", _cmd(story, a, "get", Handle("S", "7", 1), "-o", "s1"))]), a)
    assert _read_back(a, ["s1"]) == story.pages[b.name][1], "A must read what B put"

    key = story.uuid.replace("-", "")
    for guest in cluster.guests:
        shared = [r for r in _host_pools(cluster, guest).values() if r["shared"]]
        assert [(r["pool_id"], r["pages"]) for r in shared] == [
            (story.pools[guest.name]["S"], 2)
        ], shared
        assert str(shared[0]["uuid"]).replace("-", "") == key


def test_agent_restart_mid_run(cluster: Cluster, story: Story) -> None:
    a, b, agent = cluster.a, cluster.b, cluster.agent
    # An ephemeral page each, to see what a restart does with them (dropped, by contract).
    for guest, results in zip(
        cluster.guests,
        both(a, b, lambda g: g.steps([("put", _cmd(story, g, "put", Handle("E", "6", 0), "p4"))])),
        strict=True,
    ):
        _ok(results, guest)
    before = {g.name: _host_pools(cluster, g) for g in cluster.guests}
    boot_ids = {name: row["boot_id"] for name, row in agent.guest_rows().items()}

    assert agent.stop() == 0, agent.log_tail()
    agent.budget = "96M"  # the operator restarts with a bigger budget
    agent.start()
    agent.wait_attached([a.name, b.name])
    status = agent.json("status")
    assert status["tmem"]["budget_bytes"] == 96 << 20, "--budget must win"
    assert status["store"]["path"] == str(agent.store)

    # Nothing is done inside the guests: their next memd-guest calls simply work.
    def carry_on(guest: LibvirtGuest) -> dict[str, Step]:
        return guest.steps(
            [
                ("pools", "memd-guest pools"),
                ("ephemeral-gone", _cmd(story, guest, "get", Handle("E", "6", 0), "-o", "x")),
                ("put", _cmd(story, guest, "put", Handle("E", "6", 1), "p2")),
                ("get", _cmd(story, guest, "get", Handle("E", "6", 1), "-o", "e1")),
                ("cmp", "cmp p2 e1"),
            ]
        )

    for guest, results in zip(cluster.guests, both(a, b, carry_on), strict=True):
        assert results["ephemeral-gone"].rc == 1, results
        _ok({k: v for k, v in results.items() if k != "ephemeral-gone"}, guest)
        pools = _pool_lines(results["pools"].output)
        ids = story.pools[guest.name]
        assert set(pools) == {ids["P"], ids["E"], ids["S"]}, pools
        assert pools[ids["P"]] == ("persistent", "-", len(story.held[guest.name]))
        assert pools[ids["S"]][1] == story.uuid.replace("-", "")
    both(a, b, lambda g: _verify_held(story, g, "r"))

    rows = agent.guest_rows()
    for guest in cluster.guests:
        assert rows[guest.name]["boot_id"] == boot_ids[guest.name]
        assert rows[guest.name]["reboots"] == 0, "a restart is not a reboot"
        host = _host_pools(cluster, guest)
        persistent = before[guest.name][story.pools[guest.name]["P"]]
        assert host[story.pools[guest.name]["P"]]["pages"] == persistent["pages"]

    # The shared pool still joins the two guests.
    _ok(a.steps([("put", _cmd(story, a, "put", Handle("S", "8", 0), "p3"))]), a)
    _ok(b.steps([("get", _cmd(story, b, "get", Handle("S", "8", 0), "-o", "s8"))]), b)
    assert _read_back(b, ["s8"]) == story.pages[a.name][3]


def test_rebooted_guest_finds_nothing_stale(cluster: Cluster, story: Story) -> None:
    a, b, agent = cluster.a, cluster.b, cluster.agent
    old_boot = agent.guest_rows()[b.name]["boot_id"]
    b.shell.reboot(force=True, timeout=120)

    results = b.steps(
        [
            ("hello", "memd-guest hello"),
            ("pools", "memd-guest pools"),
            ("old-P", _cmd(story, b, "get", Handle("P", "2", 0), "-o", "x")),
            ("old-E", _cmd(story, b, "get", Handle("E", "6", 1), "-o", "x")),
            ("old-S", _cmd(story, b, "get", Handle("S", "8", 0), "-o", "x")),
            ("stats", "memd-guest stats"),
            ("new", "N=$(memd-guest new-pool --persistent) && echo $N"),
            ("stale", "memd-guest get $N 2 0 -o x"),  # the handle of a pre-reboot page
        ]
    )
    _ok({k: results[k] for k in ("hello", "pools", "stats", "new")}, b)
    assert results["pools"].output == "", "a rebooted guest starts without pools"
    for label in ("old-P", "old-E", "old-S"):
        assert results[label].rc == 2 and "does not exist" in results[label].output, results
    assert "pools=0" in results["stats"].output and "persistent_pages=0" in results["stats"].output
    assert results["stale"].rc == 1, results

    row = agent.guest_rows()[b.name]
    assert row["reboots"] == 1 and row["boot_id"] != old_boot, row
    assert [r["pages"] for r in _host_pools(cluster, b).values()] == [0]

    # The other guest is untouched: its pages, its pools, its shared pool.
    _verify_held(story, a, "z")
    assert set(_host_pools(cluster, a)) == set(story.pools[a.name].values())
    assert agent.guest_rows()[a.name]["reboots"] == 0
    # The operator's authorisation outlives the reboot: B may join again and sees A's page.
    rejoin = b.steps(
        [
            ("S", f"S=$(memd-guest new-pool --shared-uuid {story.uuid}) && echo $S"),
            ("get", "memd-guest get $S 8 0 -o s8"),
        ]
    )
    _ok(rejoin, b)
    assert _read_back(b, ["s8"]) == story.pages[a.name][3]

    audit = agent.json("audit")
    assert audit["clean"], audit


def test_guests_keep_persistent_pages_across_kill_9(cluster: Cluster, story: Story) -> None:
    """SIGKILL of the agent (a crash, an OOM kill): the store on tmpfs has every
    acknowledged persistent page, the restarted agent answers at once, and the guests'
    next calls simply work — same boot ids, same pools, same pages."""
    a, b, agent = cluster.a, cluster.b, cluster.agent
    before = {g.name: _host_pools(cluster, g) for g in cluster.guests}
    boot_ids = {name: row["boot_id"] for name, row in agent.guest_rows().items()}
    assert any(row["kind"] == "persistent" and row["pages"] for row in before[a.name].values())
    agent.kill()  # SIGKILL: nothing is written on the way out
    agent.start()
    agent.wait_attached([a.name, b.name])
    _verify_held(story, a, "k")  # inside the guest, byte-exact
    rows = agent.guest_rows()
    for guest in cluster.guests:
        after = _host_pools(cluster, guest)
        assert set(after) == set(before[guest.name]), (before[guest.name], after)
        for pool_id, row in before[guest.name].items():
            if row["kind"] == "persistent":
                assert after[pool_id]["pages"] == row["pages"], (pool_id, row, after[pool_id])
        assert rows[guest.name]["boot_id"] == boot_ids[guest.name]
    results = a.steps(
        [
            ("pools", "memd-guest pools"),
            ("put", f"memd-guest put {story.pools[a.name]['P']} 9 9 p0"),
            ("get", f"memd-guest get {story.pools[a.name]['P']} 9 9 -o c0"),
            ("cmp", "cmp p0 c0"),
        ]
    )
    _ok(results, a)
    audit = agent.json("audit")
    assert audit["clean"], audit
