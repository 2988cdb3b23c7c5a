"""``python3 -m memd.guest``: the memd-guest command."""

from memd.guest.cli import main

raise SystemExit(main())
