"""
The connection layer: long-lived client connections.

The protocol (framing, auth, dispatch, heartbeats, backpressure), the factory
that owns all connections (kick, graceful goaway) and the local session
registry. It speaks wire protocol v1 through L{imserver.wire} and calls the
business layer through a handler table; it knows no SQL and no Redis.
"""
