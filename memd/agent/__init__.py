"""The memd host agent: guest channel sessions, request dispatch, the control socket.

``dispatch`` is sans-I/O (a frame in, reply bytes out); ``session`` and ``server`` own
the asyncio sockets; ``control`` is the operator's JSON-lines socket.
"""
