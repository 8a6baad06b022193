"""
bench/stages.py: py-spy's collapsed stacks -> CPU-us per message by stage.
No profiler runs here: the samples are written by hand.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import TestCase

from bench import stages
from bench.__main__ import parser

SEND = (
    "<module> (twistd:1);run (twisted/internet/base.py:10);"
    "ClientProtocol.dataReceived (imserver/gateway/protocol.py:441);"
    "ClientProtocol._handle (imserver/gateway/protocol.py:497);"
    "ClientProtocol._dispatch (imserver/gateway/protocol.py:508)"
)
RAW = [
    # msgpack under the decoder: frame decode.
    SEND.rsplit(";", 1)[0] + ";decode_body (imserver/wire/codec.py:20);unpackb (msgpack/x.py:1) 3",
    # attrs validators of a frame: validation.
    SEND + ";parse_request (imserver/wire/frames.py:9);"
    "__init__ (<attrs generated methods imserver.wire.frames.Send>:3) 2",
    # msgpack under the service: send building, not push encode.
    SEND + ";ChatService.send (imserver/chat/service.py:240);"
    "pack_body (imserver/wire/codec.py:40);packb (msgpack/__init__.py:1) 4",
    # the ack's SQL run: SQL execute, not ack handling (innermost wins).
    "work (twisted/_threads/_threadworker.py:1);ack_txn (imserver/storage/sql/queries.py:5);"
    "Engine.run_script (imserver/storage/sql/engines.py:7) 5",
    # Deferred callbacks below imserver code: Deferred machinery.
    SEND + ";Deferred._runCallbacks (twisted/internet/defer.py:1) 1",
    # Twisted with no imserver frame: reactor.
    "<module> (twistd:1);doPoll (twisted/internet/epollreactor.py:3) 2",
    # nothing known: other; and a malformed line, skipped.
    "main (somewhere.py:1) 1",
    "garbage",
]


class StagesTests(TestCase):
    def test_read_raw(self) -> None:
        samples = stages.read_raw(line + "\n" for line in RAW)
        self.assertEqual(sum(samples.values()), 18)
        self.assertEqual(samples[("main (somewhere.py:1)",)], 1)

    def test_classify(self) -> None:
        samples = stages.read_raw(RAW)
        got = {stack[-1].split(" ")[0]: stages.classify(list(stack)) for stack in samples}
        self.assertEqual(
            got,
            {
                "unpackb": "frame decode",
                "__init__": "dispatch + validation",
                "packb": "send: enrichment + dict building",
                "Engine.run_script": "SQL execute (driver + DB)",
                "Deferred._runCallbacks": "Deferred machinery",
                "doPoll": "reactor + socket I/O (Twisted)",
                "main": stages.OTHER,
            },
        )

    def test_aggregate(self) -> None:
        """Samples / rate / messages, in microseconds; every stage listed once."""
        out = stages.aggregate(stages.read_raw(RAW), rate=100.0, messages=1000)
        rows = {r["stage"]: r for r in out["stages"]}
        self.assertEqual(list(rows), stages.stage_names())
        # 5 samples at 100 Hz = 50 ms over 1000 messages = 50 us each.
        self.assertEqual(rows["SQL execute (driver + DB)"]["cpu_us_per_msg"], 50.0)
        self.assertEqual(rows["frame decode"]["samples"], 3)
        self.assertEqual(rows["hot store (Lua / Redis)"]["samples"], 0)
        self.assertEqual(out["samples"], 18)
        self.assertEqual(out["cpu_us_per_msg"], 180.0)
        self.assertAlmostEqual(sum(r["share"] for r in rows.values()), 1.0, places=3)
        self.assertEqual(out["sampled_cpu_s"], 0.18)
        self.assertIsNone(out["coverage"])

    def test_aggregate_scaled_by_proc_cpu(self) -> None:
        """Sampled twice the server's CPU (a busy machine): every stage halved."""
        out = stages.aggregate(stages.read_raw(RAW), rate=100.0, messages=1000, cpu_s=0.09)
        rows = {r["stage"]: r for r in out["stages"]}
        # 5 of 18 samples, of 90 us per message.
        self.assertEqual(rows["SQL execute (driver + DB)"]["cpu_us_per_msg"], 25.0)
        self.assertEqual(rows["SQL execute (driver + DB)"]["sampled_us_per_msg"], 50.0)
        self.assertEqual(out["cpu_us_per_msg"], 90.0)
        self.assertEqual(out["sampled_us_per_msg"], 180.0)
        self.assertEqual(out["coverage"], 2.0)
        self.assertEqual(rows[stages.UNSAMPLED]["cpu_us_per_msg"], 0.0)

    def test_aggregate_unsampled_cpu(self) -> None:
        """/proc counted more than was sampled: the rest is its own row."""
        out = stages.aggregate(stages.read_raw(RAW), rate=100.0, messages=1000, cpu_s=0.3)
        rows = {r["stage"]: r for r in out["stages"]}
        self.assertEqual(rows["SQL execute (driver + DB)"]["cpu_us_per_msg"], 50.0)
        self.assertEqual(rows[stages.UNSAMPLED]["cpu_us_per_msg"], 120.0)
        self.assertEqual(out["cpu_us_per_msg"], 300.0)
        self.assertAlmostEqual(sum(r["cpu_us_per_msg"] for r in rows.values()), 300.0)

    def test_aggregate_no_messages(self) -> None:
        out = stages.aggregate(Counter(), rate=100.0, messages=0)
        self.assertEqual(out["cpu_us_per_msg"], 0.0)

    def test_top_functions(self) -> None:
        top = stages.top_functions(stages.read_raw(RAW), 1)
        self.assertEqual(top, [("Engine.run_script (imserver/storage/sql/engines.py)", 5)])

    def test_parser(self) -> None:
        args = parser().parse_args(["stages", "--stack", "mysql-redis", "--rate-hz", "99"])
        self.assertEqual((args.scenario, args.rate_hz, args.stack), ("stages", 99, "mysql-redis"))
