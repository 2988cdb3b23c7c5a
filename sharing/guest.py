"""What one guest may ask of page sharing: the :class:`GuestSharing` protocol.

A guest names only its own gfns: the guest's name (the channel its requests came on)
picks its memory, so no request can reach another guest's pages.  Two backends implement
the protocol — ``memd.agent.sharing_service.SharingService`` (simulated guests, the
mfn-keyed manager) and ``hypervisor.real_sharing.QemuSharing`` (real QEMU guests, KSM) —
and ``SharingRouter`` picks one per guest.

Errors are exceptions of the ``memd.errors`` tree, or values where a batch answers per
item (:meth:`GuestSharing.nominate`); only the agent's dispatcher turns them into wire
statuses.  :class:`memd.errors.SharingDenied`: the guest has no memory registered for
sharing, or may not merge; :class:`memd.errors.NoSuchDomain`: a gfn outside the guest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from memd.errors import MemdError


@dataclass(frozen=True)
class PageSharing:
    """How one gfn is shared now (the wire's SHARE_QUERY state follows from it)."""

    #: The gfn is RAM of the guest and has a frame (False: out of range, hole, no frame).
    mapped: bool
    #: The guest nominated it and it is still on its sharing record / ledger entry.
    nominated: bool = False
    #: gfns (over all guests) mapping its frame: 1 when private, 0 when not mapped.
    count: int = 0


#: A gfn that is out of range, in a hole or has no frame.
UNMAPPED = PageSharing(mapped=False)


class GuestSharing(Protocol):
    """Sharing as one guest may use it (its own gfns only)."""

    def has_guest(self, guest: str) -> bool:
        """True if this backend holds the guest's memory."""
        ...

    def nominate(self, guest: str, gfns: Sequence[int]) -> list[int | MemdError]:
        """Per gfn its handle, or the error that refused it (SharingDenied for every gfn
        when the guest may not nominate at all; NotShareable; NoSuchDomain)."""
        ...

    def query(self, guest: str, gfns: Sequence[int]) -> list[PageSharing]:
        """Per gfn how it is shared now (:data:`UNMAPPED` for an unknown guest)."""
        ...

    def about_to_write(self, guest: str, gfn: int) -> None:
        """Break sharing of the gfn before the guest writes it.  Raises SharingDenied
        (no memory registered for sharing) or NoSuchDomain (gfn out of range)."""
        ...
