"""Consent to cross-guest merging: the one rule, and the book every backend obeys.

Merging two guests' identical pages onto one frame (tmem de-duplication, the sharing
scanner, KSM) is a timing side channel: a guest can probe for content it does not own by
timing its own writes.  So whether a guest's pages may share a frame with another
guest's is decided here, once, by :func:`merges_across`, from two words:

* the **guest's**, from its latest HELLO: ``DEDUP_OPT_IN`` → :attr:`GuestWord.CONSENTS`,
  a HELLO without it → :attr:`GuestWord.DECLINES`; no HELLO yet → :attr:`GuestWord.SILENT`;
* the **operator's**: an opt-out (``memd optout VM``, or a QEMU started with
  ``merge=off``) forbids; attaching a running QEMU with merging on allows for a guest
  that has not spoken (it has no memd agent: KSM merges such a VM without memd too).

The rule: **a no from either side wins; otherwise a yes from either side suffices.**
The operator's opt-out overrides a guest's ``DEDUP_OPT_IN``; a guest's HELLO without
``DEDUP_OPT_IN`` overrides the operator's attach and ``memd optin`` (which only lifts an
opt-out: the operator cannot consent for a guest that declined).  A simulated guest that
never said HELLO has neither yes and is not merged across guests.  A guest's own
duplicate pages may always merge with each other (as tmem de-duplicates a non-consenting
guest's pages within its own scope).

Who applies the decision (each at the one point where its backend merges):

* tmem: the dispatcher passes :meth:`ConsentBook.hello`'s answer as the client's dedup
  consent;
* simulated guests: ``SharingManager`` refuses every merge that would put a
  non-consenting domain's gfn on a frame with another domain's, and breaks such sharing
  at once when consent ends (``set_cross_domain``);
* real guests: KSM merges every page of a mergeable QEMU with any other, so a QEMU's
  merging is on exactly while its guest merges across (``QemuSharing``); KSM has no
  "only with itself", so a non-consenting real guest is not merged at all.

:class:`ConsentBook` holds the guests' words (``_lock`` guards ``_words``); the
operator's opt-outs stay where the agent persists them and are read through the
``opted_out`` predicate given at construction.  Listeners, subscribed when their owner is
built, are called after a word changes, outside the lock, in the caller's thread, with
the guest's name; each re-reads :meth:`ConsentBook.allows`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum


class GuestWord(Enum):
    """What a guest said about cross-guest merging in its latest HELLO."""

    SILENT = "silent"  #: no HELLO yet (no memd agent in the guest, or not connected)
    CONSENTS = "consents"  #: HELLO with DEDUP_OPT_IN
    DECLINES = "declines"  #: HELLO without DEDUP_OPT_IN


def merges_across(guest: GuestWord, *, opted_out: bool, attached: bool) -> bool:
    """The rule (module docstring): may this guest's pages share frames with other guests'?

    ``opted_out``: the operator forbids it; ``attached``: the operator attached the
    guest's running QEMU with merging on (the operator's yes)."""
    if opted_out or guest is GuestWord.DECLINES:
        return False
    return guest is GuestWord.CONSENTS or attached


def _nobody(name: str) -> bool:
    return False


class ConsentBook:
    """The guests' words and the operator's opt-outs; see the module docstring."""

    def __init__(self, opted_out: Callable[[str], bool] = _nobody) -> None:
        self._opted_out = opted_out
        self._lock = threading.Lock()
        self._words: dict[str, GuestWord] = {}
        self._listeners: list[Callable[[str], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(guest)`` after each change of a guest's word or opt-out."""
        with self._lock:
            self._listeners.append(listener)

    def word(self, guest: str) -> GuestWord:
        with self._lock:
            return self._words.get(guest, GuestWord.SILENT)

    def opted_out(self, guest: str) -> bool:
        return self._opted_out(guest)

    def allows(self, guest: str, *, attached: bool = False) -> bool:
        """:func:`merges_across` for this guest now (``attached``: a real QEMU the
        operator attached with merging on)."""
        return merges_across(self.word(guest), opted_out=self._opted_out(guest), attached=attached)

    def hello(self, guest: str, dedup_opt_in: bool) -> bool:
        """Record the guest's word from a HELLO; returns whether it now merges across
        guests (what tmem takes as the client's dedup consent)."""
        word = GuestWord.CONSENTS if dedup_opt_in else GuestWord.DECLINES
        with self._lock:
            changed = self._words.get(guest, GuestWord.SILENT) is not word
            self._words[guest] = word
        if changed:
            self._notify(guest)
        return self.allows(guest)

    def operator_changed(self, guest: str) -> None:
        """The operator opted the guest out or in (the predicate now says otherwise)."""
        self._notify(guest)

    def _notify(self, guest: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(guest)
