"""The sans-IO wire layer: framing, body codec, request schemas."""

from __future__ import annotations

import struct
import threading

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import ErrorCode, ImError
from imserver.wire import codec, frames
from imserver.wire.codec import BadFrame, decode_body, encode, pack
from imserver.wire.framing import FrameDecoder, FrameTooLarge, encode_frame

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
frame_maps = st.dictionaries(st.text(max_size=10), plain, max_size=6)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


class FramingTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(min_size=1, max_size=300), max_size=10),
        st.lists(st.integers(0, 5000)),
    )
    @settings(max_examples=300)
    def test_any_split_gives_the_same_frames(self, bodies: list[bytes], cuts: list[int]) -> None:
        """However the stream is cut into reads, the same frames come out in order."""
        stream = b"".join(encode_frame(b) for b in bodies)
        decoder = FrameDecoder(1000)
        out: list[bytes] = []
        for chunk in split_at(stream, cuts):
            out.extend(decoder.feed(chunk))
        self.assertEqual(out, bodies)
        self.assertEqual(decoder.buffered, 0)

    def test_partial_header_and_body_are_kept(self) -> None:
        decoder = FrameDecoder(100)
        data = encode_frame(b"hello")
        self.assertEqual(decoder.feed(data[:2]), [])
        self.assertEqual(decoder.feed(data[2:6]), [])
        self.assertEqual(decoder.buffered, 6)
        self.assertEqual(decoder.feed(data[6:] + data), [b"hello", b"hello"])

    def test_zero_length_is_refused(self) -> None:
        with self.assertRaises(FrameTooLarge) as e:
            FrameDecoder(100).feed(b"\x00\x00\x00\x00")
        self.assertEqual(e.exception.length, 0)

    def test_length_above_limit_is_refused_before_the_body_arrives(self) -> None:
        with self.assertRaises(FrameTooLarge):
            FrameDecoder(100).feed(struct.pack(">I", 101))

    def test_limit_is_inclusive(self) -> None:
        self.assertEqual(FrameDecoder(3).feed(encode_frame(b"abc")), [b"abc"])

    def test_large_frame_in_many_reads(self) -> None:
        body = bytes(range(256)) * 256
        data = encode_frame(body)
        decoder = FrameDecoder(len(body))
        out: list[bytes] = []
        for i in range(0, len(data), 7):
            out.extend(decoder.feed(data[i : i + 7]))
        self.assertEqual(out, [body])


class CodecTests(SynchronousTestCase):
    @given(frame_maps)
    @settings(max_examples=300)
    def test_round_trip(self, frame: dict[str, object]) -> None:
        data = encode(frame)
        (body,) = FrameDecoder(2**20).feed(data)
        self.assertEqual(decode_body(body), frame)

    @given(st.binary(max_size=200))
    @settings(max_examples=1000)
    def test_garbage_only_ever_raises_bad_frame(self, data: bytes) -> None:
        try:
            result = decode_body(data)
        except BadFrame:
            return
        self.assertIsInstance(result, dict)
        self.assertTrue(all(isinstance(k, str) for k in result))

    @given(plain.filter(lambda v: not isinstance(v, dict)))
    def test_non_maps_are_bad_frames(self, value: object) -> None:
        self.assertRaises(BadFrame, decode_body, msgpack.packb(value))

    def test_binary_keys_are_bad_frames(self) -> None:
        self.assertRaises(BadFrame, decode_body, msgpack.packb({b"t": 1}, use_bin_type=True))

    def test_trailing_bytes_are_a_bad_frame(self) -> None:
        self.assertRaises(BadFrame, decode_body, pack({"t": "ping"}) + b"\x00")

    def test_extension_types_are_bad_frames(self) -> None:
        self.assertRaises(BadFrame, decode_body, msgpack.packb({"a": msgpack.ExtType(5, b"x")}))

    def test_timestamps_are_bad_frames(self) -> None:
        """Defect 7b: ext type -1 (the msgpack timestamp) bypassed the ext hook
        and was decoded into a msgpack.Timestamp."""
        for ts in (
            msgpack.Timestamp(1, 0),  # timestamp 32
            msgpack.Timestamp(1, 5),  # timestamp 64
            msgpack.Timestamp(2**40, 5),  # timestamp 96
        ):
            with self.subTest(ts=ts):
                self.assertRaises(BadFrame, decode_body, msgpack.packb({"t": "ping", "a": ts}))
        # As a key, nested, as the whole body, and malformed (length 0 and 3).
        for body in ("81d6ff00000001a0", "81a161918100d6ff00000001", "d6ff00000001"):
            with self.subTest(body=body):
                self.assertRaises(BadFrame, decode_body, bytes.fromhex(body))
        for ext in ("c700ff", "c703ff000000"):
            with self.subTest(ext=ext):
                self.assertRaises(BadFrame, decode_body, bytes.fromhex("81a161" + ext))

    @given(
        # -1 (the timestamp) is the one msgpack decodes itself: ask for it often.
        st.just(-1) | st.integers(-128, 127),
        st.sampled_from([0, 1, 2, 4, 8, 12, 16, 255, 256, 70000]),
        st.sampled_from(["value", "nested", "array"]),
    )
    @settings(max_examples=400)
    def test_every_extension_type_is_a_bad_frame(self, code: int, size: int, where: str) -> None:
        """Every ext code, reserved (-128..-1) or application (0..127), in
        every ext encoding (fixext 1/2/4/8/16, ext 8/16/32)."""
        data = bytes(size)
        if size in (1, 2, 4, 8, 16):
            head = bytes([{1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}[size]])
        elif size < 256:
            head = bytes([0xC7, size])
        elif size < 65536:
            head = b"\xc8" + struct.pack(">H", size)
        else:
            head = b"\xc9" + struct.pack(">I", size)
        ext = head + struct.pack(">b", code) + data
        body = {
            "value": b"\x82\xa1t\xa4ping\xa1a" + ext,
            "nested": b"\x82\xa1t\xa4ping\xa1a\x81\xa1b\x91" + ext,
            "array": b"\x82\xa1t\xa4ping\xa1a\x92\x01" + ext,
        }[where]
        self.assertRaises(BadFrame, decode_body, body)

    def test_invalid_utf8_is_a_bad_frame(self) -> None:
        self.assertRaises(BadFrame, decode_body, b"\x81\xa1t\xa2\xff\xfe")

    def test_byte_level_example_from_the_protocol_document(self) -> None:
        """The example frame in docs/protocol.md, byte for byte."""
        data = encode({"t": "ping", "id": 1})
        self.assertEqual(data.hex(" "), "00 00 00 0c 82 a1 74 a4 70 69 6e 67 a2 69 64 01")


class PackerTests(SynchronousTestCase):
    """codec.packb keeps a Packer per thread: the same bytes as msgpack.packb."""

    def test_same_bytes_as_packb(self) -> None:
        for obj in ({"t": "msg", "body": "hé", "b": b"\x00"}, [1, -2, 2**63 - 1], "x" * 70_000):
            self.assertEqual(codec.packb(obj), msgpack.packb(obj, use_bin_type=True))
            self.assertEqual(codec.packb(obj), msgpack.packb(obj, use_bin_type=True))

    def test_an_error_leaves_the_packer_clean(self) -> None:
        self.assertRaises(TypeError, codec.packb, {"a": 1, "b": object()})
        self.assertEqual(codec.packb({"c": 2}), msgpack.packb({"c": 2}))

    def test_a_large_frame_drops_the_packer(self) -> None:
        """Its grown buffer is not kept for the thread."""
        codec.packb(1)
        kept = codec._packers.packer
        codec.packb("x" * (codec.KEEP_PACKER_BYTES + 1))
        self.assertFalse(hasattr(codec._packers, "packer"))
        codec.packb(1)
        self.assertIsNot(codec._packers.packer, kept)

    def test_threads_do_not_share_a_packer(self) -> None:
        wrong: list[object] = []

        def work(n: int) -> None:
            for i in range(2000):
                obj = {"n": n, "i": i, "pad": "y" * (i % 50)}
                if codec.packb(obj) != msgpack.packb(obj, use_bin_type=True):
                    wrong.append(obj)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(wrong, [])


class RequestSchemaTests(SynchronousTestCase):
    def parse(self, frame: dict[str, object]) -> frames.Request:
        return frames.parse_request(frame)

    def assertCode(self, code: ErrorCode, frame: dict[str, object]) -> None:
        with self.assertRaises(ImError) as e:
            self.parse(frame)
        self.assertEqual(e.exception.code, code, e.exception.message)

    def test_auth(self) -> None:
        request = self.parse({"t": "auth", "id": 1, "token": "abc", "device": "phone"})
        self.assertEqual(request, frames.Auth(id=1, token="abc", device="phone", client=None))

    def test_auth_device_and_since(self) -> None:
        """Devices: absent is "default" (every v1 client), 1..64 characters, since >= 0."""
        request = self.parse({"t": "auth", "id": 1, "token": "abc"})
        self.assertEqual(request, frames.Auth(id=1, token="abc", device="default"))
        request = self.parse({"t": "auth", "id": 1, "token": "a", "device": "é" * 64, "since": 0})
        self.assertEqual(request, frames.Auth(id=1, token="a", device="é" * 64, since=0))
        self.assertCode(
            ErrorCode.TOO_LARGE, {"t": "auth", "id": 1, "token": "a", "device": "x" * 129}
        )
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": "a", "device": 5})
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": "a", "since": -1})
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": "a", "since": "1"})

    def test_v1_device_strings_still_authenticate(self) -> None:
        """
        Regression (review): v1 took device strings of 0..128 characters; an
        empty one or one over 64 failed auth after devices came. Empty is the
        default device; a long one a stable name of 64 characters.
        """
        request = self.parse({"t": "auth", "id": 1, "token": "a", "device": ""})
        assert isinstance(request, frames.Auth)
        self.assertEqual(request.device, "default")
        names = set()
        for long in ("x" * 65, "x" * 128, "x" * 127 + "y", "é" * 100):
            request = self.parse({"t": "auth", "id": 1, "token": "a", "device": long})
            assert isinstance(request, frames.Auth)
            self.assertEqual(len(request.device), 64)
            self.assertEqual(request.device, frames.device_name(long))
            names.add(request.device)
        self.assertEqual(len(names), 4)

    def test_device_ops(self) -> None:
        self.assertEqual(
            self.parse({"t": "catchup", "id": 1}), frames.Catchup(id=1, after=None, limit=100)
        )
        self.assertEqual(
            self.parse({"t": "catchup", "id": 1, "after": 0, "limit": 500}),
            frames.Catchup(id=1, after=0, limit=500),
        )
        self.assertCode(ErrorCode.TOO_LARGE, {"t": "catchup", "id": 1, "limit": 501})
        self.assertCode(ErrorCode.INVALID, {"t": "catchup", "id": 1, "after": -1})
        self.assertEqual(self.parse({"t": "devices", "id": 1}), frames.Devices(id=1))
        self.assertEqual(
            self.parse({"t": "logout_device", "id": 1, "device": "pc"}),
            frames.LogoutDevice(id=1, device="pc"),
        )
        self.assertCode(ErrorCode.INVALID, {"t": "logout_device", "id": 1})
        self.assertCode(ErrorCode.TOO_LARGE, {"t": "logout_device", "id": 1, "device": "x" * 65})

    def test_ack_seq(self) -> None:
        """ack takes msg_ids, seq, or both; never neither."""
        self.assertEqual(self.parse({"t": "ack", "id": 1, "seq": 7}), frames.Ack(1, (), 7))
        self.assertEqual(
            self.parse({"t": "ack", "id": 1, "msg_ids": [5], "seq": 0}), frames.Ack(1, (5,), 0)
        )
        self.assertEqual(self.parse({"t": "ack", "id": 1, "msg_ids": [5]}), frames.Ack(1, (5,)))
        self.assertCode(ErrorCode.INVALID, {"t": "ack", "id": 1})
        self.assertCode(ErrorCode.INVALID, {"t": "ack", "id": 1, "seq": -1})
        self.assertCode(ErrorCode.INVALID, {"t": "ack", "id": 1, "msg_ids": [], "seq": 1})

    def test_envelope(self) -> None:
        self.assertCode(ErrorCode.INVALID, {"id": 1})
        self.assertCode(ErrorCode.INVALID, {"t": 5, "id": 1})
        self.assertCode(ErrorCode.INVALID, {"t": "ping"})
        self.assertCode(ErrorCode.INVALID, {"t": "ping", "id": "1"})
        self.assertCode(ErrorCode.INVALID, {"t": "ping", "id": True})
        self.assertCode(ErrorCode.INVALID, {"t": "ping", "id": 2**63})
        self.assertCode(ErrorCode.UNKNOWN_OP, {"t": "fly", "id": 1})

    def test_unknown_op_error_does_not_echo_a_huge_op(self) -> None:
        """Defect 7c: the error echoed the op's repr, up to 4 bytes per byte
        received ("\\x00"), so a 64 KB request made an error frame over
        max_frame_bytes; the op is now cut in the message."""
        for op in ("\x00" * 60_000, "é" * 30_000, "x" * 65_000):
            with self.subTest(op=op[:3]):
                e = self.assertRaises(ImError, frames.parse_request, {"t": op, "id": 1})
                self.assertEqual(e.code, ErrorCode.UNKNOWN_OP)
                self.assertLess(len(pack(frames.error(e.code, e.message, 1))), 300)
                self.assertTrue(e.message.startswith("unknown op "))
        e = self.assertRaises(ImError, frames.parse_request, {"t": "fly", "id": 1})
        self.assertEqual(e.message, "unknown op 'fly'")

    def test_field_errors(self) -> None:
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1})
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": 7})
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": ""})
        self.assertCode(ErrorCode.TOO_LARGE, {"t": "auth", "id": 1, "token": "x" * 5000})
        self.assertCode(ErrorCode.INVALID, {"t": "auth", "id": 1, "token": "x", "device": 3})

    def test_int_extractors(self) -> None:
        self.assertEqual(frames.req_int({"n": 5}, "n"), 5)
        for bad in (True, 1.0, "5", None, 0, -1):
            self.assertRaises(ImError, frames.req_int, {"n": bad}, "n")
        self.assertEqual(frames.opt_int({}, "n", 7), 7)
        self.assertEqual(frames.opt_limit({"n": 100}, "n", 20, 100), 100)
        with self.assertRaises(ImError) as e:
            frames.opt_limit({"n": 101}, "n", 20, 100)
        self.assertEqual(e.exception.code, ErrorCode.TOO_LARGE)

    def test_int_list(self) -> None:
        self.assertEqual(frames.req_int_list({"l": [1, 2]}, "l", max_items=2), (1, 2))
        for bad in ([], [1, "2"], "12", None, [0]):
            self.assertRaises(ImError, frames.req_int_list, {"l": bad}, "l", max_items=5)
        with self.assertRaises(ImError) as e:
            frames.req_int_list({"l": [1, 2, 3]}, "l", max_items=2)
        self.assertEqual(e.exception.code, ErrorCode.TOO_LARGE)

    @given(plain)
    def test_plain_data_is_accepted(self, value: object) -> None:
        frames.check_plain(value, "body")

    def test_non_plain_data_is_refused(self) -> None:
        for bad in (b"bytes", {1: "x"}, [b"x"], {"a": {"b": msgpack.Timestamp(1)}}):
            self.assertRaises(ImError, frames.check_plain, bad, "body")
        deep: object = "x"
        for _ in range(20):
            deep = [deep]
        self.assertRaises(ImError, frames.check_plain, deep, "body")

    def test_replies(self) -> None:
        self.assertEqual(frames.ok(3, {"a": 1}), {"t": "ok", "id": 3, "a": 1})
        self.assertEqual(frames.ok(3), {"t": "ok", "id": 3})
        self.assertEqual(
            frames.error(ErrorCode.INVALID, "no", 3),
            {"t": "error", "code": "invalid", "message": "no", "id": 3},
        )
        self.assertNotIn("id", frames.error(ErrorCode.BAD_FRAME, "no"))
        self.assertEqual(frames.push("kick", reason="x"), {"t": "kick", "reason": "x"})
