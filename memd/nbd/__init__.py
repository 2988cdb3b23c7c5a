"""memd's NBD server: each guest's swap disk, served to QEMU from its tmem pool.

One module per protocol layer, lowest first:

* :mod:`memd.nbd.proto` — the numbers of the NBD protocol (magics, options, commands,
  flags, errno values) and this server's limits;
* :mod:`memd.nbd.handshake` — fixed-newstyle negotiation as a sans-I/O state machine;
* :mod:`memd.nbd.transmission` — request parsing with validation, and simple replies
  (sans-I/O);
* :mod:`memd.nbd.export` — what a request *does*: pages of one guest's persistent tmem
  pool (no I/O);
* :mod:`memd.nbd.server` — the asyncio unix-socket shell around the above.

The normative description of the wire format is the NBD project's ``doc/proto.md``;
what memd supports of it is in ``docs/nbd.md``.
"""
