"""The twistd plugin's options and service maker: C{twistd -n imserver [--config PATH]}."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from imserver.config import Config, ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run an imserver node. Without --config it runs on the embedded default: "
        "SQLite in the working directory, an in-process hot store, and listeners "
        "on 127.0.0.1:7000 (clients) and 127.0.0.1:7080 (HTTP)."
    )
    optParameters = [
        ["config", "c", None, "Path to a TOML configuration file (see conf/)."],
    ]

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"])
            config.check_deployable()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["parsed"] = config


def makeService(options: Options) -> IService:
    """Wire the node; nothing starts until twistd starts the service."""
    from twisted.internet import reactor  # the composition root picks the reactor

    from imserver.server import IMServer

    config: Config = options["parsed"]
    service: IService = IMServer(config, reactor)
    return service
