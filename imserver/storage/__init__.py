"""
The data layer: durable records in SQL (L{imserver.storage.sql}) and the hot
index in Redis or in process (L{imserver.storage.hot}). Nothing here knows
about connections.
"""
