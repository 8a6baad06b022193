"""
Wire protocol v1, sans-IO.

Framing (L{imserver.wire.framing}), the body codec (L{imserver.wire.codec}) and
the frame schemas (L{imserver.wire.frames}). Nothing here knows about sockets,
reactors or storage: bytes and dicts go in, bytes, dicts and typed requests
come out.
"""
