"""
The Redis fan-out script groups its commands (a session's window written
once per batch, a recipient's marker read once, a pending list written once
per sender), so it must leave what the messages' one-by-one effects leave:
the in-process store is that reference. Random batches (several messages
per session, late and too-old ones among them, out of id order, repeated,
edited, acked before their fan-out; ready, loading and absent copies) go to
both; windows, cached messages, pending lists (None where a copy is not
usable: never loaded, or marked for a reload by a too-old fan-out) and
summaries must then agree.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import TestCase

from imserver.config import parse_config
from imserver.storage.hot.interface import GONE_MS, LIVE_MS, IHotStore
from imserver.storage.hot.memory import MemoryHotStore
from imserver.storage.hot.redis import RedisHotStore
from imserver.storage.model import Message, UserSnapshot
from tests.harness import fresh_prefix, shared_redis
from tests.support import reactor

WINDOW = 4
SESSIONS = (11, 12, 13)
USERS = (1, 2, 3, 4)


def _batch(rng: random.Random, next_id: int) -> list[tuple[Message, int]]:
    out = []
    for i in range(rng.randint(1, 12)):
        sender, recipient = rng.sample(USERS, 2)
        age = rng.choice([0, 3, 50, 0, 7, LIVE_MS + 1, GONE_MS])
        message = Message(
            msg_id=next_id + i,
            session_id=rng.choice(SESSIONS),
            sender=sender,
            recipient=recipient,
            cid=f"c{next_id + i}",
            type="text",
            body=b"\x81\xa1t\xa1x",
            ts=1_700_000_000_000 + i,
        )
        out.append((message, age))
    # Now and then not in id order (a replayed fan-out, a duplicate).
    if rng.random() < 0.2:
        rng.shuffle(out)
    if rng.random() < 0.1 and out:
        out.append(out[0])
    return out


def _sorted(summary: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
    return None if summary is None else sorted(summary)


async def _state(hot: IHotStore, ids: list[int]) -> dict[str, object]:
    return {
        "windows": {s: await hot.window(s, None, 100) for s in SESSIONS},
        "cached": sorted(await hot.messages(ids)),
        "pending": {u: await hot.pending(u, 0, 1000, None) for u in USERS},
        # (sender, count, last) in no particular order.
        "summary": {u: _sorted(await hot.offline_summary(u)) for u in USERS},
    }


class FanoutGroupingTests(TestCase):
    timeout = 120

    async def test_grouped_script_matches_one_by_one_effects(self) -> None:
        target = parse_config({"storage": {"redis": shared_redis().url}}).storage.redis
        assert target is not None
        for seed in range(200):
            rng = random.Random(seed)
            memory = MemoryHotStore(reactor, window_size=WINDOW)
            redis = RedisHotStore(reactor, target, fresh_prefix(), window_size=WINDOW)
            await redis.start()
            try:
                stores: list[IHotStore] = [memory, redis]
                # Users 1 and 2 have ready copies, 3 a load under way, 4 none.
                for hot in stores:
                    for uid in (1, 2):
                        token = await hot.load_begin(uid)
                        await hot.load_finish(uid, token, UserSnapshot(uid, (), ()))
                    await hot.load_begin(3)
                ids: list[int] = []
                next_id = 1000
                for _ in range(rng.randint(1, 6)):
                    batch = _batch(rng, next_id)
                    next_id += 100
                    ids += [m.msg_id for m, _ in batch]
                    if rng.random() < 0.3:
                        edited = rng.choice(batch)[0]
                        for hot in stores:
                            await hot.invalidate([], [], [edited.msg_id])
                    if rng.random() < 0.3:
                        acked = [(m.msg_id, m.sender) for m, _ in batch if m.recipient == 1]
                        for hot in stores:
                            await hot.ack([(1, acked[:2])])
                    for hot in stores:
                        await hot.fanout(batch, [])
                expected = await _state(memory, ids)
                self.assertEqual(await _state(redis, ids), expected, f"seed {seed}")
            finally:
                await redis.stop()
