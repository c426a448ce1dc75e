"""Framing and codecs: pure, fast, fed anything."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gp2p.codec import EncodeError, JsonCodec, MsgpackCodec, by_id, by_name
from gp2p.errors import DisconnectReason, FrameTooLarge, ProtocolError
from gp2p.messages import validate
from gp2p.wire import FrameDecoder, frame, parse_preamble, preamble

CODECS = {1: True, 2: True}

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def test_preamble_round_trip_and_rejections():
    assert parse_preamble(preamble(1), CODECS) == 1
    assert parse_preamble(preamble(2), CODECS) == 2
    with pytest.raises(ProtocolError, match="magic"):
        parse_preamble(b"HTTP/1", CODECS)
    with pytest.raises(ProtocolError) as info:
        parse_preamble(b"GP2P\x02\x01", CODECS)
    assert info.value.reason == DisconnectReason.UNSUPPORTED_VERSION
    with pytest.raises(ProtocolError, match="codec"):
        parse_preamble(b"GP2P\x01\x09", CODECS)


def test_frame_split_anywhere_and_byte_by_byte():
    bodies = [b"", b"a", b"hello world" * 100, bytes(range(256))]
    stream = b"".join(frame(b, 1 << 20) for b in bodies)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(1 << 20)
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == bodies
    decoder = FrameDecoder(1 << 20)
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i:i + 1])
    assert out == bodies
    assert decoder.buffered == 0


def test_oversized_header_rejected_before_body():
    decoder = FrameDecoder(1000)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(struct.pack(">I", 1001))  # the header alone is enough
    assert info.value.reason == DisconnectReason.FRAME_TOO_LARGE
    assert FrameDecoder(1000).feed(struct.pack(">I", 1000)) == []
    with pytest.raises(FrameTooLarge):
        frame(b"x" * 1001, 1000)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), st.sampled_from([1, 2]))
def test_arbitrary_bytes_only_raise_protocol_error_and_stay_bounded(chunks, codec_id):
    limit = 256
    decoder = FrameDecoder(limit)
    codec = by_id(codec_id)
    try:
        for chunk in chunks:
            for body in decoder.feed(chunk):
                try:
                    validate(codec.decode(body))
                except ProtocolError:
                    pass
            assert decoder.buffered <= 4 + limit + len(chunk)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([1, 2]))
def test_garbage_bodies_decode_or_raise_protocol_error(body, codec_id):
    try:
        validate(by_id(codec_id).decode(body))
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(payloads)
def test_codecs_round_trip_payloads(payload):
    for codec in (MsgpackCodec(), JsonCodec()):
        msg = {"type": "msg", "kind": "k", "payload": payload}
        assert codec.decode(codec.encode(msg)) == msg


def test_json_carries_bytes_as_b64_object():
    codec = by_name("json")
    data = codec.encode({"x": b"\x00\xff"})
    assert data == b'{"x":{"$b":"AP8="}}'
    assert codec.decode(data) == {"x": b"\x00\xff"}
    with pytest.raises(ProtocolError):
        codec.decode(b'{"x":{"$b":"***"}}')


def test_unencodable_values_raise_encode_error():
    for codec in (MsgpackCodec(), JsonCodec()):
        with pytest.raises(EncodeError):
            codec.encode({"x": object()})


def test_msgpack_refuses_extension_types():
    import msgpack

    data = msgpack.packb({"type": "msg", "x": msgpack.ExtType(5, b"abc")})
    with pytest.raises(ProtocolError, match="extension"):
        MsgpackCodec().decode(data)


def test_validate_checks_fields_and_passes_unknown_types():
    assert validate({"type": "ping", "nonce": 5}) == "ping"
    assert validate({"type": "future-thing", "x": 1}) == "future-thing"
    for bad in ([], {"nonce": 1}, {"type": ""}, {"type": "ping", "nonce": -1},
                {"type": "ping", "nonce": "1"}, {"type": "msg", "payload": 1},
                {"type": "disconnect", "reason": 1, "text": 5}):
        with pytest.raises(ProtocolError):
            validate(bad)


def test_json_refuses_lone_surrogates_but_keeps_escaped_pairs():
    codec = JsonCodec()
    assert codec.decode(b'{"a":"\\ud83d\\ude00"}') == {"a": "\U0001F600"}
    for bad in (b'{"a":"\\ud800"}', b'{"\\udfff":1}', b'["ok",["\\udc00x"]]'):
        with pytest.raises(ProtocolError, match="surrogate"):
            codec.decode(bad)


def test_json_escapes_dicts_that_look_like_its_markers():
    codec = JsonCodec()
    for payload in ({"$b": ""}, {"$b": None}, {"$d": [1]}, [{"$b": {"$d": b"x"}}], {"$b": "AP8="}):
        msg = {"type": "msg", "kind": "k", "payload": payload}
        assert codec.decode(codec.encode(msg)) == msg
    with pytest.raises(ProtocolError):
        codec.decode(b'{"$d":[["other",1]]}')
