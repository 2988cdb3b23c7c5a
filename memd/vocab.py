"""The vocabulary every layer shares: page size, the batch limit, pool flags, object ids.

One definition each, at the bottom of the import graph (beside :mod:`memd.errors`), so that
the guest protocol (:mod:`memd.wire`), the tmem core, the sharing manager and the host I/O
layer cannot disagree about what a page or a batch is.  The guest image carries this module.
"""

from __future__ import annotations

import enum

#: Bytes in one guest page: the unit of tmem, sharing, the wire protocol and the swap disk.
PAGE_SIZE = 4096
PAGE_SHIFT = 12

#: Pages in one batch: one PUT_BATCH/GET_BATCH frame, and one tmem batch call (the NBD
#: export splits longer runs into batches of this size).
MAX_BATCH = 128

#: A tmem object id: 192 bits as three unsigned 64-bit words.
Oid = tuple[int, int, int]


class PoolFlag(enum.IntFlag):
    """Pool kind, as a guest asks for it in NEW_POOL (no bit: ephemeral and private)."""

    EPHEMERAL = 0
    PERSISTENT = 0x1
    SHARED = 0x2
