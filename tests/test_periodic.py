"""
Background loops and their logs: an ordinary backend outage is a warning
without a traceback; anything unexpected stays critical with its traceback.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.errors import Unavailable
from imserver.periodic import Periodic
from tests.stack import make_stack


class LogCapture:
    """Every event logged while the test runs (the global publisher)."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def about(self, what: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("what") == what]


class PeriodicLogTests(SynchronousTestCase):
    def loop(self, error: Exception) -> tuple[Clock, Periodic]:
        clock = Clock()

        async def tick() -> None:
            raise error

        loop = Periodic(clock, 5.0, tick, "test loop")
        loop.start()
        self.addCleanup(loop.stop)
        return clock, loop

    def test_an_outage_is_a_warning_without_traceback(self) -> None:
        """Defect 9: a database outage was logged as CRITICAL with a traceback."""
        logs = LogCapture(self)
        clock, loop = self.loop(Unavailable("the database is unavailable"))
        clock.advance(5)
        (event,) = logs.about("test loop")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        self.assertIn("the database is unavailable", event["error"])
        self.assertEqual(self.flushLoggedErrors(), [])
        # It goes on, and counts the failed ticks.
        clock.advance(5)
        self.assertEqual(loop.failures, 2)
        self.assertTrue(loop.running)

    def test_an_unexpected_error_stays_critical(self) -> None:
        logs = LogCapture(self)
        clock, loop = self.loop(KeyError("bug"))
        clock.advance(5)
        (event,) = logs.about("test loop")
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertIn("log_failure", event)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertTrue(loop.running)


class SweeperLogTests(TestCase):
    async def test_the_outbox_sweeper_warns_of_a_database_outage(self) -> None:
        """Defect 9, end to end: the sweeper's tick meets Unavailable from the store."""
        stack = await make_stack(self, "embedded")
        logs = LogCapture(self)

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise Unavailable("the database is unavailable")

        stack.store.replay_outbox = down  # type: ignore[method-assign]
        await stack.chat._sweeper._run()
        (event,) = logs.about("outbox sweep")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        self.assertEqual(self.flushLoggedErrors(), [])


class NotifierLogTests(TestCase):
    async def test_a_notification_meeting_an_outage_is_a_warning(self) -> None:
        """The notification poll, per notification: the unread total (or the
        retry's write) meets a database outage; it is claimed again later."""
        from imserver.config import LimitsConfig, NotifyConfig
        from imserver.services.notifier import Notifier
        from tests.support import sleep

        stack = await make_stack(
            self, "embedded", limits=LimitsConfig(send_per_second=1e6), notify_delay_ms=0
        )
        a, b = 90_001, 90_002
        for uid in (a, b):
            await stack.chat.login(uid)
        await stack.chat.send(a, b, "n1", "text", "hello")
        await stack.settle()
        await sleep(0.01)
        posted: list[dict[str, Any]] = []

        async def total_unread(uid: int) -> int:
            raise Unavailable("the database is unavailable")

        async def post(payload: dict[str, Any]) -> None:
            posted.append(payload)

        config = NotifyConfig(webhook="http://127.0.0.1:9/x", secret="s" * 16)
        notifier = Notifier(stack.chat.clock, stack.store, config, total_unread, post=post)
        logs = LogCapture(self)
        self.assertEqual(await notifier.poll(), 1)
        self.assertEqual(posted, [])
        (event,) = [e for e in logs.events if "msg_id" in e]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        self.assertEqual(self.flushLoggedErrors(), [])
