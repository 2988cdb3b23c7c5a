"""Consent to cross-guest merging (sharing.consent): one rule, obeyed by the scanner's
manager, tmem and the agent's dispatcher alike.

The defect these tests pin: a domain bound for scanning had its pages merged with
another guest's although neither guest sent DEDUP_OPT_IN in HELLO.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.simmachine import SimMachine
from memd import wire
from memd.agent.dispatch import Dispatcher, GuestState
from memd.agent.sharing_service import SharingRouter, SharingService
from memd.errors import MergeNotConsented
from memd.wire import Capability, Status
from sharing.consent import ConsentBook, GuestWord, merges_across
from sharing.manager import SharingManager
from tmem.host import TmemHost

PAGES = 64
PLAIN = int(Capability.BATCH | Capability.SHARING | Capability.STATS)
CONSENTING = PLAIN | int(Capability.DEDUP_OPT_IN)


class Host:
    """The sans-I/O agent core: dispatcher + tmem + simulated sharing, one ConsentBook."""

    def __init__(self, opted_out: set[str] | None = None) -> None:
        self.machine = SimMachine(4 * PAGES + 64)
        self.consent = ConsentBook((opted_out or set()).__contains__)
        self.manager = SharingManager(self.machine)
        self.sharing = SharingService(self.manager, consent=self.consent)
        self.tmem = TmemHost(budget_bytes=8 << 20)
        self.dispatcher = Dispatcher(self.tmem, SharingRouter(self.sharing), consent=self.consent)
        self.guests: dict[str, GuestState] = {}
        rng = np.random.default_rng(11)
        self.content = rng.integers(0, 256, size=(PAGES, 4096), dtype=np.uint8)

    def add_guest(self, name: str, pages: np.ndarray | None = None) -> int:
        domid = self.machine.create_domain(PAGES)
        self.machine.fill(domid, 0, self.content if pages is None else pages)
        self.sharing.bind(name, domid)
        return domid

    def hello(self, name: str, capabilities: int) -> None:
        guest = self.guests.setdefault(name, GuestState(name))
        request = wire.encode_request(
            1, wire.HelloRequest(wire.MIN_VERSION, wire.MAX_VERSION, capabilities, bytes(16))
        )
        [frame] = wire.FrameDecoder().feed(request)
        assert isinstance(frame, wire.Frame)
        [reply] = wire.FrameDecoder().feed(self.dispatcher.handle(guest, frame))
        assert isinstance(reply, wire.Frame) and reply.status == Status.OK

    def frames_in_common(self, a: int, b: int) -> int:
        pa, _ = self.machine.lookup_range(a, 0, PAGES)
        pb, _ = self.machine.lookup_range(b, 0, PAGES)
        return len(np.intersect1d(pa, pb))


def test_two_guests_that_did_not_consent_are_not_merged_across() -> None:
    host = Host()
    a, b = host.add_guest("a"), host.add_guest("b")
    host.hello("a", PLAIN)
    host.hello("b", PLAIN)
    report = host.sharing.scan()
    assert host.frames_in_common(a, b) == 0
    assert report["saved"] == 0 and host.manager.audit().clean


def test_two_silent_simulated_guests_are_not_merged_across() -> None:
    host = Host()
    a, b = host.add_guest("a"), host.add_guest("b")
    host.sharing.scan()
    assert host.frames_in_common(a, b) == 0


def test_two_consenting_guests_are_merged() -> None:
    host = Host()
    a, b = host.add_guest("a"), host.add_guest("b")
    host.hello("a", CONSENTING)
    host.hello("b", CONSENTING)
    report = host.sharing.scan()
    assert host.frames_in_common(a, b) == PAGES and report["saved"] == PAGES
    assert host.manager.audit().clean


def test_one_consenting_guest_is_not_enough() -> None:
    host = Host()
    a, b = host.add_guest("a"), host.add_guest("b")
    host.hello("a", CONSENTING)
    host.hello("b", PLAIN)
    host.sharing.scan()
    assert host.frames_in_common(a, b) == 0


def test_a_non_consenting_guest_still_merges_its_own_duplicates() -> None:
    """As tmem de-duplicates a non-consenting guest within its own scope."""
    host = Host()
    twice = np.concatenate([host.content[: PAGES // 2], host.content[: PAGES // 2]])
    a, b = host.add_guest("a", twice), host.add_guest("b", twice)
    host.hello("a", PLAIN)
    host.hello("b", PLAIN)
    report = host.sharing.scan()
    assert report["saved"] == PAGES  # each guest: PAGES/2 pairs of its own
    assert host.frames_in_common(a, b) == 0
    pa, _ = host.machine.lookup_range(a, 0, PAGES)
    assert len(np.unique(pa)) == PAGES // 2
    assert host.manager.audit().clean


def test_a_guest_that_withdraws_consent_gets_private_copies_at_once() -> None:
    host = Host()
    a, b, c = host.add_guest("a"), host.add_guest("b"), host.add_guest("c")
    for name in ("a", "b", "c"):
        host.hello(name, CONSENTING)
    host.sharing.scan()
    assert host.frames_in_common(a, b) == PAGES
    host.hello("a", PLAIN)  # its guest reconnects without DEDUP_OPT_IN
    assert host.frames_in_common(a, b) == 0 and host.frames_in_common(a, c) == 0
    assert host.frames_in_common(b, c) == PAGES  # the others stay merged
    assert host.machine.read(a, 5) == host.content[5].tobytes()
    assert host.manager.audit().clean
    host.sharing.scan()
    assert host.frames_in_common(a, b) == 0  # and the next scan leaves it alone
    assert not host.tmem.client_stats("a")[0].dedup  # tmem follows the same word


def test_the_operators_opt_out_beats_the_guests_consent() -> None:
    opted_out = {"b"}
    host = Host(opted_out)
    a, b = host.add_guest("a"), host.add_guest("b")
    host.hello("a", CONSENTING)
    host.hello("b", CONSENTING)
    host.sharing.scan()
    assert host.frames_in_common(a, b) == 0
    assert not host.tmem.client_stats("b")[0].dedup
    opted_out.discard("b")  # `memd optin b`
    host.consent.operator_changed("b")
    host.sharing.scan()
    assert host.frames_in_common(a, b) == PAGES


def test_the_manager_refuses_a_merge_across_domains_without_consent() -> None:
    machine = SimMachine(16)
    mgr = SharingManager(machine)
    a, b = machine.create_domain(2), machine.create_domain(2)
    for d in (a, b):
        machine.write(d, 0, b"same")
    ha, hb = mgr.nominate(a, 0), mgr.nominate(b, 0)
    with pytest.raises(MergeNotConsented):
        mgr.share(a, 0, ha, b, 0, hb)
    [err] = mgr.share_many([(a, 0, ha, b, 0, hb)])
    assert isinstance(err, MergeNotConsented)
    mgr.set_cross_domain(a, True)
    mgr.set_cross_domain(b, True)
    mgr.share(a, 0, ha, b, 0, hb)
    assert machine.lookup(a, 0)[0] == machine.lookup(b, 0)[0]
    assert mgr.set_cross_domain(b, False) == 1  # b's gfn gets a private copy
    assert machine.lookup(a, 0)[0] != machine.lookup(b, 0)[0]
    assert mgr.audit().clean


@pytest.mark.parametrize("guest", list(GuestWord))
@pytest.mark.parametrize("opted_out", [False, True])
@pytest.mark.parametrize("attached", [False, True])
def test_the_rule(guest: GuestWord, opted_out: bool, attached: bool) -> None:
    """A no from either side wins; otherwise a yes from either side suffices."""
    want = (
        not opted_out
        and guest is not GuestWord.DECLINES
        and (guest is GuestWord.CONSENTS or attached)
    )
    assert merges_across(guest, opted_out=opted_out, attached=attached) is want


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=8),
    st.lists(st.integers(0, PAGES - 1), min_size=0, max_size=6),
)
def test_after_any_sequence_of_words_only_consenting_guests_share_frames(
    words: list[tuple[str, bool]], writes: list[int]
) -> None:
    host = Host()
    domids = {name: host.add_guest(name) for name in "abc"}
    for i, (name, consents) in enumerate(words):
        host.hello(name, CONSENTING if consents else PLAIN)
        host.sharing.scan()
        if i < len(writes):  # guests keep writing (copy-on-write) in between
            host.machine.write(domids[name], writes[i], b"w")
    report = host.manager.audit()
    assert report.clean, report.findings
    for x in "abc":
        for y in "abc":
            if x < y and not (host.consent.allows(x) and host.consent.allows(y)):
                assert host.frames_in_common(domids[x], domids[y]) == 0
