"""imserver: a one-to-one instant messaging server on Twisted."""

__version__ = "0.1.0"
