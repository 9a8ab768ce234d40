"""cluster area: heartbeats, membership and the site secrets.

- ``pki``: site CA, node certificates, heartbeat secret and per-module keys;
- ``heartbeat``: the packet format (pure encode/decode);
- ``membership``: who is alive on which network (pure, time passed in);
- ``transport``: UDP sockets and timers (``HeartbeatService``).

Design notes: docs/dev/heartbeats.md.
"""
