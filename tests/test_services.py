"""Services: ids, content filter, rate limit, and the group-commit batcher."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imserver.batching import Batcher, QueueFull
from imserver.errors import ErrorCode, ImError
from imserver.services.filter import ContentFilter
from imserver.services.ids import EPOCH_MS, MAX_ID, IdGenerator, id_node, id_time_ms
from imserver.services.ratelimit import TokenBucket


class IdTests(SynchronousTestCase):
    def clock(self, ms: int = EPOCH_MS + 10**9) -> Clock:
        clock = Clock()
        clock.advance(ms / 1000)
        return clock

    def test_layout(self) -> None:
        clock = self.clock()
        ids = IdGenerator(1023, clock)
        first = ids.next_id()
        self.assertEqual(id_node(first), 1023)
        self.assertEqual(id_time_ms(first), int(clock.seconds() * 1000))
        self.assertLess(first, 2**53)

    def test_strictly_increasing_even_when_the_clock_steps_back(self) -> None:
        clock = self.clock()
        ids = IdGenerator(5, clock)
        seen = [ids.next_id() for _ in range(50)]
        clock.advance(-10)
        seen += [ids.next_id() for _ in range(50)]
        clock.advance(100)
        seen += [ids.next_id() for _ in range(5)]
        self.assertEqual(seen, sorted(set(seen)))
        self.assertTrue(all(id_node(i) == 5 for i in seen))

    @given(st.lists(st.floats(-5, 5, allow_nan=False), max_size=200))
    def test_increasing_for_any_clock_moves(self, moves: list[float]) -> None:
        clock = self.clock()
        ids = IdGenerator(3, clock)
        last = ids.next_id()
        for move in moves:
            clock.advance(move)
            now = ids.next_id()
            self.assertGreater(now, last)
            last = now

    def test_burst_borrows_from_the_next_millisecond(self) -> None:
        clock = self.clock()
        ids = IdGenerator(1, clock)
        burst = [ids.next_id() for _ in range(8 * 10)]
        self.assertEqual(len(set(burst)), 80)
        self.assertEqual(id_time_ms(burst[-1]) - id_time_ms(burst[0]), 9)
        # Back in step once the wall clock catches up.
        clock.advance(0.1)
        self.assertEqual(id_time_ms(ids.next_id()), int(clock.seconds() * 1000))

    def test_nodes_never_collide(self) -> None:
        clock = self.clock()
        a, b = IdGenerator(1, clock), IdGenerator(2, clock)
        self.assertFalse({a.next_id() for _ in range(100)} & {b.next_id() for _ in range(100)})

    def test_bounds(self) -> None:
        self.assertRaises(ValueError, IdGenerator, 1024, Clock())
        self.assertRaises(OverflowError, IdGenerator(1, Clock()).next_id)
        self.assertEqual(MAX_ID, 2**53 - 1)


class FilterTests(SynchronousTestCase):
    def test_reject_case_insensitive(self) -> None:
        f = ContentFilter(["Bad Word", "spam"], "reject")
        self.assertEqual(f.apply("all fine"), "all fine")
        for text in ("this is a BAD word", "SpAm!", "xxspamxx"):
            with self.assertRaises(ImError) as e:
                f.apply(text)
            self.assertEqual(e.exception.code, ErrorCode.CONTENT_BLOCKED)

    def test_mask_keeps_everything_else(self) -> None:
        f = ContentFilter(["spam", "ham"], "mask")
        self.assertEqual(f.apply("Spam and HAM, spam!"), "**** and ***, ****!")

    def test_overlapping_patterns(self) -> None:
        f = ContentFilter(["abc", "bcd"], "mask")
        self.assertEqual(f.apply("xabcdx"), "x****x")

    def test_unicode(self) -> None:
        f = ContentFilter(["ärger", "坏话"], "mask")
        self.assertEqual(f.apply("ÄRGER und 坏话"), "***** und **")
        # A character whose lower case is longer does not shift offsets.
        self.assertEqual(f.apply("İ ärger"), "İ *****")

    def test_map_bodies(self) -> None:
        f = ContentFilter(["spam"], "mask")
        self.assertEqual(
            f.apply({"text": "spam", "spam": 1, "nested": [{"t": "SPAM x"}]}),
            {"text": "****", "spam": 1, "nested": [{"t": "**** x"}]},
        )

    def test_empty_word_list_and_blank_lines(self) -> None:
        f = ContentFilter(["", "  "], "reject")
        self.assertFalse(f.enabled)
        self.assertEqual(f.apply("anything"), "anything")

    def test_from_file(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("# comment\nspam\n\nEggs\n")
        f = ContentFilter.from_file(path, "mask")
        self.assertEqual(f.apply("spam eggs"), "**** ****")
        self.assertFalse(ContentFilter.from_file(None, "reject").enabled)


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(2.0, 3, clock)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)


class BatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.runs: list[list[int]] = []
        self.pending: list[Deferred[list[int]]] = []

    def run_batch(self, items: Sequence[int]) -> Deferred[list[int]]:
        self.runs.append(list(items))
        d: Deferred[list[int]] = Deferred()
        self.pending.append(d)
        return d

    def test_items_arriving_during_a_batch_form_the_next_one(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch, max_batch=3)
        results = [b.submit(i) for i in range(5)]
        self.assertEqual(self.runs, [[0]])
        self.pending[0].callback([0])
        self.assertEqual(self.runs, [[0], [1, 2, 3]])
        self.pending[1].callback([10, 20, 30])
        self.assertEqual(self.runs[-1], [4])
        self.pending[2].callback([40])
        self.assertEqual([self.successResultOf(r) for r in results], [0, 10, 20, 30, 40])
        self.successResultOf(b.idle())

    def test_failure_fails_the_whole_batch_only(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch)
        first = b.submit(1)
        second, third = b.submit(2), b.submit(3)
        self.pending[0].errback(ZeroDivisionError())
        self.failureResultOf(first, ZeroDivisionError)
        self.pending[1].callback([2, 3])
        self.assertEqual([self.successResultOf(second), self.successResultOf(third)], [2, 3])

    def test_wrong_result_count_is_an_error(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch)
        d = b.submit(1)
        self.pending[0].callback([1, 2])
        self.failureResultOf(d, RuntimeError)

    def test_queue_bound(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch, max_queue=2)
        b.submit(1)
        b.submit(2)
        b.submit(3)
        with self.assertRaises(QueueFull) as e:
            b.submit(4)
        self.assertEqual(e.exception.code, ErrorCode.UNAVAILABLE)
        self.assertEqual(b.depth, 2)

    def test_synchronous_batches_keep_order(self) -> None:
        """Results reach callers in batch order even when batches finish at once."""
        order: list[int] = []
        b: Batcher[int, int] = Batcher("t", lambda items: succeed(list(items)))
        for i in range(5):
            b.submit(i).addCallback(order.append)
        self.assertEqual(order, [0, 1, 2, 3, 4])

    def test_concurrency(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch, concurrency=2, max_batch=10)
        for i in range(4):
            b.submit(i)
        self.assertEqual(self.runs, [[0], [1]])
        self.pending[1].callback([1])
        self.assertEqual(self.runs, [[0], [1], [2, 3]])

    def test_results_in_start_order_whatever_finishes_first(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch, concurrency=2, max_batch=10)
        order: list[int] = []
        for i in range(3):
            b.submit(i).addCallback(order.append)
        self.assertEqual(self.runs, [[0], [1]])
        self.pending[1].callback([1])  # the second batch finishes first
        self.assertEqual(order, [])
        self.assertEqual(self.runs, [[0], [1], [2]])  # a slot was free
        self.pending[0].callback([0])
        self.assertEqual(order, [0, 1])
        self.pending[2].callback([2])
        self.assertEqual(order, [0, 1, 2])
        self.successResultOf(b.idle())

    def test_a_failed_batch_keeps_its_place(self) -> None:
        b: Batcher[int, int] = Batcher("t", self.run_batch, concurrency=2)
        first, second = b.submit(1), b.submit(2)
        self.pending[1].callback([2])
        self.assertNoResult(second)
        self.pending[0].errback(ZeroDivisionError())
        self.failureResultOf(first, ZeroDivisionError)
        self.assertEqual(self.successResultOf(second), 2)
