"""The twistd plugin's options and service maker: C{twistd -n imserver [--config PATH]}."""

from __future__ import annotations

import os

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
        ["worker-index", None, None, "Internal: run as worker K of [server].workers."],
    ]

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"])
            config.check_deployable()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        index = self["worker-index"]
        if index is not None and not (index.isdigit() and int(index) < config.server.workers):
            raise usage.UsageError(f"--worker-index must be in 0..{config.server.workers - 1}")
        self["parsed"] = config


def makeService(options: Options) -> IService:
    """Wire the node (or the supervisor of several); nothing starts until twistd starts it."""
    from twisted.internet import reactor  # the composition root picks the reactor

    from imserver.server import IMServer
    from imserver.supervisor import SUPERVISOR_PID, Supervisor, die_with_parent

    config: Config = options["parsed"]
    index = options["worker-index"]
    service: IService
    if index is not None:
        die_with_parent(int(os.environ.get(SUPERVISOR_PID, os.getppid())))
        service = IMServer(config, reactor, worker_index=int(index), gc_tuning=True)
    elif config.server.workers > 1:
        service = Supervisor(config, options["config"], reactor)
    else:
        service = IMServer(config, reactor, gc_tuning=True)
    return service
