"""The fair admission queue in front of the shared SQL work (issue 9, defect 3)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import ErrorCode, ImError
from imserver.fairqueue import FairQueue


class Jobs:
    """Jobs that record when they start and finish when told."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.pending: dict[tuple[str, int], Deferred[Any]] = {}

    def job(self, key: str, n: int) -> Any:
        def run() -> Deferred[Any]:
            self.started.append((key, n))
            d: Deferred[Any] = Deferred()
            self.pending[(key, n)] = d
            return d

        return run

    def finish(self, key: str, n: int) -> None:
        self.pending.pop((key, n)).callback((key, n))


class FairQueueTests(SynchronousTestCase):
    def test_starts_at_once_when_free(self) -> None:
        q: FairQueue[int] = FairQueue(2)
        self.assertEqual(self.successResultOf(q.submit("a", lambda: 5)), 5)
        self.assertEqual(self.successResultOf(q.submit("a", lambda: succeed(6))), 6)
        self.assertEqual((q.running, q.depth), (0, 0))

    def test_errors_reach_the_caller(self) -> None:
        q: FairQueue[int] = FairQueue(2)

        def boom() -> int:
            raise ImError(ErrorCode.FORBIDDEN, "no")

        self.failureResultOf(q.submit("a", boom), ImError)
        self.assertEqual(q.running, 0)

    def test_a_flood_does_not_go_before_others(self) -> None:
        jobs = Jobs()
        q: FairQueue[Any] = FairQueue(2, per_key=2)
        results = [q.submit("flood", jobs.job("flood", i)) for i in range(100)]
        other = q.submit("other", jobs.job("other", 0))
        self.assertEqual(jobs.started, [("flood", 0), ("flood", 1)])
        jobs.finish("flood", 0)
        # the next slot goes to the other key, not to the flood's third job
        self.assertEqual(jobs.started[-1], ("other", 0))
        jobs.finish("other", 0)
        self.assertEqual(self.successResultOf(other), ("other", 0))
        while jobs.pending:
            jobs.finish(*min(jobs.pending))
        self.assertEqual([self.successResultOf(r)[1] for r in results], list(range(100)))
        self.assertEqual([n for k, n in jobs.started if k == "flood"], list(range(100)))
        self.assertEqual((q.running, q.depth), (0, 0))

    def test_per_key_cap(self) -> None:
        jobs = Jobs()
        q: FairQueue[Any] = FairQueue(8, per_key=2)
        for i in range(5):
            q.submit("a", jobs.job("a", i))
        self.assertEqual(len(jobs.started), 2)
        q.submit("b", jobs.job("b", 0))
        self.assertEqual(len(jobs.started), 3)
        jobs.finish("a", 0)
        self.assertEqual(jobs.started[-1], ("a", 2))

    def test_discard_fails_waiting_jobs_only(self) -> None:
        jobs = Jobs()
        q: FairQueue[Any] = FairQueue(1)
        first = q.submit("a", jobs.job("a", 0))
        second = q.submit("a", jobs.job("a", 1))
        q.discard("a", Failure(ImError(ErrorCode.UNAVAILABLE, "gone")))
        self.failureResultOf(second, ImError)
        jobs.finish("a", 0)
        self.successResultOf(first)
        self.assertEqual(jobs.started, [("a", 0)])
        self.assertEqual((q.running, q.depth), (0, 0))

    def test_many_synchronous_jobs_do_not_recurse(self) -> None:
        jobs = Jobs()
        q: FairQueue[Any] = FairQueue(1)
        q.submit("a", jobs.job("a", 0))
        results = [q.submit("b", lambda: 1) for _ in range(5000)]
        jobs.finish("a", 0)
        self.assertEqual(sum(self.successResultOf(r) for r in results), 5000)

    @given(
        st.integers(1, 4),
        st.integers(1, 4),
        st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=60),
    )
    def test_bounds_and_order_hold(
        self, concurrency: int, per_key: int, steps: list[tuple[str, bool]]
    ) -> None:
        jobs = Jobs()
        q: FairQueue[Any] = FairQueue(concurrency, per_key=per_key)
        counts = {"a": 0, "b": 0, "c": 0}
        for key, finish in steps:
            if finish and jobs.pending:
                jobs.finish(*sorted(jobs.pending)[0])
            else:
                q.submit(key, jobs.job(key, counts[key]))
                counts[key] += 1
            self.assertLessEqual(q.running, concurrency)
            for k in counts:
                self.assertLessEqual(sum(1 for p in jobs.pending if p[0] == k), per_key)
            # no slot stays free while a key below its own cap has work waiting
            if q.running < concurrency:
                for k in q._waiting:
                    self.assertEqual(sum(1 for p in jobs.pending if p[0] == k), per_key)
        while jobs.pending:
            jobs.finish(*sorted(jobs.pending)[0])
        self.assertEqual((q.running, q.depth), (0, 0))
        for k in counts:
            self.assertEqual([n for kk, n in jobs.started if kk == k], list(range(counts[k])))
