"""Hypothesis state machine: random nominate/share/unshare/guest writes/domain
destroy against a model of what each guest last wrote.

After every step: the audit is clean, every guest reads back exactly what it
last wrote, and no handle that stopped being current ever becomes current again.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hypervisor.simmachine import SimMachine
from memd.errors import (
    ContentMismatch,
    MergeNotConsented,
    OutOfFrames,
    SharingError,
    StaleClientHandle,
    StaleSourceHandle,
)
from sharing.machine import PageType
from sharing.manager import SharingManager
from tests.sharing.sharing_helpers import page

PAGES = 6
DOMAINS = 3
CONTENTS = [page(bytes([v])) for v in (0, 1, 2)]


class SharingModel(RuleBasedStateMachine):
    @initialize()
    def boot(self) -> None:
        # Two spare frames only: unshare runs out of frames now and then.
        self.m = SimMachine(DOMAINS * PAGES + 2)
        self.mgr = SharingManager(self.m, cross_domain_default=True)
        self.doms = [self.m.create_domain(PAGES) for _ in range(DOMAINS)]
        self.model = {(d, g): CONTENTS[0] for d in self.doms for g in range(PAGES)}
        self.handles: list[tuple[int, int, int]] = []
        self.current: set[int] = set()
        self.retired: set[int] = set()

    def _page(self, di: int, g: int) -> tuple[int, int]:
        return self.doms[di % len(self.doms)], g % PAGES

    @rule(di=st.integers(0, 9), g=st.integers(0, 9), v=st.integers(0, 2))
    def guest_write(self, di: int, g: int, v: int) -> None:
        d, g = self._page(di, g)
        try:
            self.m.write(d, g, CONTENTS[v])
        except OutOfFrames:
            return
        self.model[(d, g)] = CONTENTS[v]

    @rule(di=st.integers(0, 9), g=st.integers(0, 9), v=st.integers(0, 2))
    def guest_write_partial(self, di: int, g: int, v: int) -> None:
        """A one-byte write: the rest of the page must survive the CoW copy."""
        d, g = self._page(di, g)
        try:
            self.m.write(d, g, bytes([v]), offset=100)
        except OutOfFrames:
            return
        old = self.model[(d, g)]
        self.model[(d, g)] = old[:100] + bytes([v]) + old[101:]

    @rule(di=st.integers(0, 9), g=st.integers(0, 9))
    def nominate(self, di: int, g: int) -> None:
        d, g = self._page(di, g)
        h = self.mgr.nominate(d, g)
        assert h not in self.retired
        self.handles.append((d, g, h))

    @rule(i=st.integers(0, 1000), j=st.integers(0, 1000))
    def share(self, i: int, j: int) -> None:
        if not self.handles:
            return
        sd, sg, sh = self.handles[i % len(self.handles)]
        cd, cg, ch = self.handles[j % len(self.handles)]
        if (sd, sg) not in self.model or (cd, cg) not in self.model:
            return  # the domain went away
        expected: type[SharingError] | None = None
        if self.mgr.handle_of(sd, sg) != sh:
            expected = StaleSourceHandle
        elif self.mgr.handle_of(cd, cg) != ch:
            expected = StaleClientHandle
        elif self.model[(sd, sg)] != self.model[(cd, cg)]:
            expected = ContentMismatch
        else:
            # Consent: gfns of two domains meet on one frame only if both merge across.
            smfn, cmfn = self.m.lookup(sd, sg)[0], self.m.lookup(cd, cg)[0]
            meeting = {d for d, _ in self.mgr.gfns_of(smfn) + self.mgr.gfns_of(cmfn)}
            if len(meeting) > 1 and not all(self.mgr.merges_across(d) for d in meeting):
                expected = MergeNotConsented
        try:
            self.mgr.share(sd, sg, sh, cd, cg, ch)
        except SharingError as err:
            assert type(err) is expected, (err, expected)
        else:
            assert expected is None
            assert self.m.lookup(sd, sg)[0] == self.m.lookup(cd, cg)[0]

    @rule(di=st.integers(0, 9), allowed=st.booleans())
    def consent(self, di: int, allowed: bool) -> None:
        """A guest's consent to cross-guest merging changes (sharing.consent)."""
        d = self.doms[di % len(self.doms)]
        try:
            self.mgr.set_cross_domain(d, allowed)
        except OutOfFrames:
            # Could not give every gfn a private copy: this caller gives up and lets the
            # domain merge across again (the audit would list the gfns left behind).
            self.mgr.set_cross_domain(d, True)
        if not allowed and not self.mgr.merges_across(d):
            for g in range(PAGES):
                mfn, ptype = self.m.lookup(d, g)
                if ptype == PageType.SHARED:
                    assert {x for x, _ in self.mgr.gfns_of(mfn)} == {d}

    @rule(di=st.integers(0, 9), g=st.integers(0, 9))
    def unshare(self, di: int, g: int) -> None:
        d, g = self._page(di, g)
        was_shared = self.m.lookup(d, g)[1] == PageType.SHARED
        try:
            assert self.mgr.unshare(d, g) == was_shared
        except OutOfFrames:
            assert was_shared
            assert self.m.lookup(d, g)[1] == PageType.SHARED

    @rule(di=st.integers(0, 9), budget=st.integers(1, 8))
    def destroy_and_recreate(self, di: int, budget: int) -> None:
        d = self.doms.pop(di % len(self.doms))
        self.mgr.destroy_domain(d, budget=budget)
        for g in range(PAGES):
            del self.model[(d, g)]
        new = self.m.create_domain(PAGES)
        self.doms.append(new)
        for g in range(PAGES):
            self.model[(new, g)] = CONTENTS[0]

    @invariant()
    def audit_is_clean(self) -> None:
        report = self.mgr.audit()
        assert report.clean, report.to_dict()

    @invariant()
    def guests_read_what_they_wrote(self) -> None:
        for (d, g), data in self.model.items():
            assert self.m.read(d, g) == data

    @invariant()
    def retired_handles_stay_retired(self) -> None:
        now = set()
        for d in self.doms:
            for g in range(PAGES):
                h = self.mgr.handle_of(d, g)
                if h is not None:
                    now.add(h)
        assert not now & self.retired
        self.retired |= self.current - now
        self.current = now


SharingModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSharingModel = SharingModel.TestCase
