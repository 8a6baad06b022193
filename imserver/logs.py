"""
Log observers. Use JSON lines with C{twistd --logger=imserver.logs.json ...};
every event's keyword fields appear as JSON keys.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json() -> ILogObserver:
    """A twistd C{--logger} factory: one JSON object per line on stdout."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
