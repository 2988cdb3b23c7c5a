"""The memd host agent: guest channel sessions, request dispatch, the control socket.

``dispatch`` is sans-I/O (a frame in, reply bytes out); ``server`` owns the guests'
asyncio sockets; ``control`` is the operator's JSON-lines socket, serving the typed
command table of ``commands`` through the ``handlers``.  ``real_guests``, ``swap_disks``
and ``persistence`` are the components those handlers drive; ``app`` wires them.
"""
