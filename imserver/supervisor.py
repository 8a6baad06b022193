"""
Several worker processes on one machine: C{[server] workers = N}.

The twistd process started by the operator becomes a supervisor: it runs N
workers (C{twistd -n imserver --config PATH --worker-index K}), each a full
node with its own node id (C{[server].node_id + K}) listening on the shared
ports with SO_REUSEPORT, so the kernel spreads connections over them. A
worker that dies is started again (after 1 s, doubling up to 30 s while it
keeps dying quickly). On SIGTERM the supervisor passes the signal on, waits
for the workers' graceful shutdown, and kills what is left after the budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.config import Config

#: A worker that lived longer than this had a fresh crash: restart it soon.
STABLE_SECONDS = 30.0
MAX_RESTART_DELAY = 30.0
PR_SET_PDEATHSIG = 1
#: The environment variable that gives workers the supervisor's pid.
SUPERVISOR_PID = "IMSERVER_SUPERVISOR_PID"


def die_with_parent(parent: int) -> None:
    """
    In a worker: get SIGTERM when the supervisor dies, even by SIGKILL, so
    no orphan keeps the port (Linux; elsewhere a no-op). C{parent} is the
    supervisor's pid, read before this call: if it is already gone, exit.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class Supervisor(Service):
    log = Logger()

    def __init__(self, config: Config, config_path: str, reactor: Any) -> None:
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.workers: dict[int, WorkerProtocol] = {}
        self._started_at: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self.stopping = False
        #: Workers restarted so far (in the restart log line).
        self.restarted = 0

    def argv(self, index: int) -> list[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [
            twistd,
            "-n",
            "--pidfile=",
            "imserver",
            "--config",
            self.config_path,
            "--worker-index",
            str(index),
        ]

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "starting {n} workers (node ids {first}..{last})",
            n=self.config.server.workers,
            first=self.config.server.node_id,
            last=self.config.server.node_id + self.config.server.workers - 1,
        )
        for index in range(self.config.server.workers):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        protocol = WorkerProtocol(self, index)
        self.workers[index] = protocol
        self._started_at[index] = self.reactor.seconds()
        argv = self.argv(index)
        self.reactor.spawnProcess(
            protocol,
            argv[0],
            argv,
            env={**os.environ, SUPERVISOR_PID: str(os.getpid())},
            childFDs={0: "w", 1: 1, 2: 2},
        )

    def worker_ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        if self.workers.get(index) is protocol:
            del self.workers[index]
        if self.stopping:
            return
        lived = self.reactor.seconds() - self._started_at.get(index, 0.0)
        delay = (
            1.0
            if lived > STABLE_SECONDS
            else min(MAX_RESTART_DELAY, 2 * self._delays.get(index, 0.5))
        )
        self._delays[index] = delay
        self.restarted += 1
        status = "" if reason.check(ProcessDone) else f" ({reason.value})"
        self.log.warn(
            "worker {index} exited{status}; restarting it in {delay:.0f}s"
            " ({restarts} restarts so far)",
            index=index,
            status=status,
            delay=delay,
            restarts=self.restarted,
        )
        self._restarts[index] = self.reactor.callLater(delay, self.spawn, index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waiting = [p.ended for p in self.workers.values()]
        for protocol in list(self.workers.values()):
            self._signal(protocol, signal.SIGTERM)
        budget = self.config.server.shutdown_seconds + 10
        killer = self.reactor.callLater(budget, self._kill_all)
        done = DeferredList(waiting)
        done.addBoth(lambda _: killer.active() and killer.cancel())
        return done

    def _kill_all(self) -> None:
        for protocol in list(self.workers.values()):
            self.log.warn("worker {index} did not stop in time: killing it", index=protocol.index)
            self._signal(protocol, signal.SIGKILL)

    def _signal(self, protocol: WorkerProtocol, sig: int) -> None:
        try:
            protocol.transport.signalProcess(sig)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass
