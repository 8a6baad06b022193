"""twistd plugin: C{twistd -n imserver}. Lazy: importing it loads nothing of imserver."""

from twisted.application.service import ServiceMaker

imserver = ServiceMaker(
    "imserver",
    "imserver.tap",
    "One-to-one instant messaging server (wire protocol v1)",
    "imserver",
)
