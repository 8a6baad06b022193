"""
The service layer: capabilities the business layer composes (tokens, id
generation, the content filter, rate limits, presence and push routing,
queues, notifications). Services depend on storage, never on the gateway.
"""
