"""
One bad item must never fail the other items of a batch (issue 9, defect 1's
rule, beyond the send group commit).

* L{Batcher}: a batch function gives a L{Failure} (or an exception) for an
  item it could not do, which fails that item alone; raising still fails the
  whole batch (outages). Unit and hypothesis tests on L{task.Clock}.
* The ack and login batches of L{Store}: a transaction that fails for
  anything but an outage is run again in halves, so only the item the
  database refuses fails; on both engines (a trigger refuses one item).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.batching import Batcher, ItemFailure
from imserver.errors import Unavailable


class ItemError(Exception):
    pass


class BatchError(Exception):
    pass


class BatcherItemFailureTests(SynchronousTestCase):
    def test_a_failure_result_fails_that_item_alone(self) -> None:
        def run(items: Sequence[int]) -> Deferred[list[int | ItemFailure]]:
            out: list[int | ItemFailure] = []
            for i in items:
                if i == 2:
                    out.append(Failure(ItemError(i)))
                elif i == 3:
                    out.append(ItemError(i))  # an exception instance will do too
                else:
                    out.append(i * 10)
            d: Deferred[list[int | ItemFailure]] = Deferred()
            pending.append((d, out))
            return d

        pending: list[tuple[Deferred[list[int | ItemFailure]], list[int | ItemFailure]]] = []
        b: Batcher[int, int] = Batcher("t", run)
        first = b.submit(0)
        rest = [b.submit(i) for i in range(1, 5)]
        for d, out in pending[:1]:
            d.callback(out)
        for d, out in pending[1:]:
            d.callback(out)
        self.assertEqual(self.successResultOf(first), 0)
        self.assertEqual(self.successResultOf(rest[0]), 10)
        self.failureResultOf(rest[1], ItemError)
        self.failureResultOf(rest[2], ItemError)
        self.assertEqual(self.successResultOf(rest[3]), 40)
        self.successResultOf(b.idle())

    def test_raising_still_fails_the_whole_batch(self) -> None:
        def run(items: Sequence[int]) -> Deferred[list[int]]:
            d: Deferred[list[int]] = Deferred()
            d.errback(Unavailable("down"))
            return d

        b: Batcher[int, int] = Batcher("t", run, gather=Clock())
        ds = [b.submit(i) for i in range(3)]
        assert b.gather is not None
        clock = b.gather
        assert isinstance(clock, Clock)
        clock.advance(0)
        for d in ds:
            self.failureResultOf(d, Unavailable)

    def test_an_item_failure_keeps_the_order_of_results(self) -> None:
        """Failed items are delivered in their place: callbacks fire in submit order."""
        order: list[tuple[int, bool]] = []

        async def run(items: Sequence[int]) -> list[int | ItemFailure]:
            return [ItemError(i) if i % 3 == 1 else i for i in items]

        b: Batcher[int, int] = Batcher("t", run, gather=Clock())
        for i in range(9):
            b.submit(i).addCallbacks(
                lambda r: order.append((r, True)),
                lambda f: order.append((f.value.args[0], False)),
            )
        assert isinstance(b.gather, Clock)
        b.gather.advance(0)
        self.assertEqual(order, [(i, i % 3 != 1) for i in range(9)])


#: How an item of the property test ends: ok, a Failure result, an exception
#: result, or (for its whole batch) the batch function raises.
MODES = ("ok", "failure", "exception", "batch")


class BatcherIsolationProperty(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        items=st.lists(
            st.tuples(
                st.sampled_from(MODES),
                st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.1]),
            ),
            min_size=1,
            max_size=60,
        ),
        durations=st.lists(st.sampled_from([0.0, 0.002, 0.02, 0.2]), min_size=1, max_size=8),
        max_batch=st.integers(1, 8),
        concurrency=st.integers(1, 3),
        gather=st.booleans(),
    )
    def test_each_item_gets_its_own_outcome(
        self,
        items: list[tuple[str, float]],
        durations: list[float],
        max_batch: int,
        concurrency: int,
        gather: bool,
    ) -> None:
        """
        Whatever the timing, batch size and concurrency: an item's Deferred
        fails only if its own result is a failure or its own batch raised;
        every other item gets its result; callbacks fire in submit order.
        """
        clock = Clock()
        modes = [mode for mode, _ in items]
        runs: list[list[int]] = []
        running = [0]
        peak = [0]
        took = itertools.cycle(durations)

        async def run(batch: Sequence[int]) -> list[int | ItemFailure]:
            runs.append(list(batch))
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            try:
                await deferLater(clock, next(took), lambda: None)
            finally:
                running[0] -= 1
            if any(modes[i] == "batch" for i in batch):
                raise BatchError(batch[0])
            out: list[int | ItemFailure] = []
            for i in batch:
                if modes[i] == "failure":
                    out.append(Failure(ItemError(i)))
                elif modes[i] == "exception":
                    out.append(ItemError(i))
                else:
                    out.append(i * 7)
            return out

        b: Batcher[int, int] = Batcher(
            "p", run, max_batch=max_batch, concurrency=concurrency, gather=clock if gather else None
        )
        got: list[tuple[int, str, Any]] = []
        for i, (_, pause) in enumerate(items):
            clock.advance(pause)
            b.submit(i).addCallbacks(
                lambda r, i=i: got.append((i, "ok", r)),
                lambda f, i=i: got.append((i, type(f.value).__name__, f.value.args[0])),
            )
        while b.busy:
            clock.advance(0.01)
        self.successResultOf(b.idle())
        # Every item ran in exactly one batch, in submit order, none too big.
        self.assertEqual([i for batch in runs for i in batch], list(range(len(items))))
        self.assertTrue(all(1 <= len(batch) <= max_batch for batch in runs))
        self.assertLessEqual(peak[0], concurrency)
        batch_of = {i: batch for batch in runs for i in batch}
        expected = []
        for i, mode in enumerate(modes):
            batch = batch_of[i]
            if any(modes[j] == "batch" for j in batch):
                expected.append((i, "BatchError", batch[0]))
            elif mode == "ok":
                expected.append((i, "ok", i * 7))
            else:
                expected.append((i, "ItemError", i))
        self.assertEqual(got, expected)
