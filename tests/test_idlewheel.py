"""The idle wheel (issue 13): one timer for every connection's idle timeout."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imserver.gateway.idlewheel import IdleWheel, Timed


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_bucket: dict[Timed, None] | None = None


class IdleWheelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.expired: list[tuple[str, float]] = []
        self.wheel = IdleWheel(self.clock, self.on_expired, resolution=1.0)

    def on_expired(self, item: Timed) -> None:
        assert isinstance(item, Item)
        self.expired.append((item.name, self.clock.seconds()))

    def test_due_at_the_deadline_rounded_up_to_the_resolution(self) -> None:
        a, b = Item("a"), Item("b")
        self.wheel.add(a, 1010.0)
        self.wheel.add(b, 1010.25)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(9.75)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.25)
        self.assertEqual(self.expired, [("a", 1010.0)])
        self.clock.advance(0.75)
        self.assertEqual(self.expired, [("a", 1010.0)])  # never early, at most 1 s late
        self.clock.advance(0.25)
        self.assertEqual(self.expired, [("a", 1010.0), ("b", 1011.0)])
        self.assertEqual((self.wheel.size, self.clock.getDelayedCalls()), (0, []))

    def test_an_earlier_deadline_rearms_the_one_timer(self) -> None:
        self.wheel.add(Item("late"), 1090)
        self.wheel.add(Item("early"), 1005)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 1005)
        self.clock.advance(5)
        self.assertEqual(self.expired, [("early", 1005)])
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 1090)

    def test_discard_leaves_the_wheel_and_the_last_cancels_the_timer(self) -> None:
        a, b = Item("a"), Item("b")
        self.wheel.add(a, 1010)
        self.wheel.add(b, 1020)
        self.wheel.discard(a)
        self.wheel.discard(a)  # not in it: nothing
        self.assertIsNone(a.idle_bucket)
        self.assertEqual(self.wheel.size, 1)
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
        self.wheel.discard(b)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_adding_again_moves_the_item(self) -> None:
        a = Item("a")
        self.wheel.add(a, 1010)
        self.wheel.add(a, 1030)
        self.assertEqual(self.wheel.size, 1)
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
        self.clock.advance(20)
        self.assertEqual(self.expired, [("a", 1030)])

    def test_expired_may_file_the_item_again(self) -> None:
        """The lazy idle check: still active, the item goes to a later bucket."""
        a = Item("a")
        again = [1020.0, 1035.0]

        def refile(item: Timed) -> None:
            self.on_expired(item)
            if again:
                self.wheel.add(item, again.pop(0))

        self.wheel = IdleWheel(self.clock, refile)
        self.wheel.add(a, 1010)
        for step in (10, 10, 15, 5):
            self.clock.advance(step)
        self.assertEqual(self.expired, [("a", 1010), ("a", 1020), ("a", 1035)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_check_does_not_stop_the_others(self) -> None:
        def boom(item: Timed) -> None:
            assert isinstance(item, Item)
            self.expired.append((item.name, self.clock.seconds()))
            if item.name == "a":
                raise RuntimeError("boom")

        self.wheel = IdleWheel(self.clock, boom)
        for name in ("a", "b"):
            self.wheel.add(Item(name), 1010)
        self.wheel.add(Item("c"), 1020)
        self.clock.advance(10)
        self.assertEqual(sorted(n for n, _ in self.expired), ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(self.expired[-1], ("c", 1020))

    def test_resolution_must_be_positive(self) -> None:
        self.assertRaises(ValueError, IdleWheel, self.clock, self.on_expired, 0)
