"""The wire contract (`loader_client.protocol`): round trips without copies, and a decoder that
turns every malformed or hostile message into a ProtocolError naming the problem.

Unit tests only: no sockets, no server.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_client import protocol
from loader_client.protocol import ProtocolError, decode, encode


def header(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def valid(mtype: str, **fields) -> dict:
    return {"v": protocol.VERSION, "type": mtype, **fields}


def sample_array(dtype: str, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    dt = np.dtype(dtype)
    values = np.arange(int(np.prod(shape))).reshape(shape)
    if dt.kind == "b":
        return (values % 3 == 0).astype(dt)
    if dt.kind == "c":
        return (values + 1j * values.ravel()[::-1].reshape(shape)).astype(dt)
    return (values % 100).astype(dt)


ALLOWED = sorted(protocol.ALLOWED_DTYPES)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_allowed_dtypes_are_the_plain_numeric_and_bool_ones():
    kinds = {np.dtype(d).kind for d in ALLOWED}
    assert kinds == set("biufc")
    assert len(ALLOWED) == 14
    assert np.dtype(object).str not in protocol.ALLOWED_DTYPES


def test_header_fields_round_trip():
    frames = encode("request", {"epoch": 3, "batches": [0, 5, 7], "wait_s": 1.25, "extra": "kept"})
    assert len(frames) == 1
    msg = decode(frames)
    assert msg.type == "request"
    assert msg["epoch"] == 3
    assert msg["batches"] == [0, 5, 7]
    assert msg["wait_s"] == 1.25
    assert msg.get("extra") == "kept"  # unknown fields are ignored by the schema, not dropped
    assert msg.get("missing", "default") == "default"
    assert "v" not in msg.fields and "type" not in msg.fields
    assert msg.arrays == {}


def test_every_message_type_round_trips_with_its_required_fields():
    examples = {
        "hello": {"dataset": "train", "shard": [1, 4]},
        "request": {"epoch": 0, "batches": [0]},
        "cancel": {"keep_epoch": 2},
        "ping": {}, "stats": {}, "bye": {}, "pong": {}, "stop": {},
        "welcome": {"dataset": "train", "num_samples": 203, "batch_size": 16, "batches": 13,
                    "specs": [["x", "<f4", [16]], ["y", "<f4", []]]},
        "batch": {"epoch": 1, "index": 12},
        "stats_reply": {"stats": {"rejected": {}, "nested": [1, 2.5, "x"]}},
        "error": {"code": "out_of_range", "message": "batch 99 is out of range", "epoch": 0, "index": 99},
        "ready": {"worker": 0, "pid": 1234, "host": "localhost"},
        "task": {"task": 1, "dataset": "train", "epoch": 0, "index": 0, "slot": 3},
        "done": {"task": 1, "rows": 16, "busy_s": 0.01},
        "failed": {"task": 1, "message": "boom"},
        "join": {"pid": 1234, "host": "worker-host"},
        "setup": {"root": "/data", "heartbeat_s": 1.0,
                  "datasets": [{"name": "train", "fingerprint": "ab", "manifest": [["a.npy", 128]]}]},
        "refused": {"message": "dataset 'train': file #0 differs"},
        "heartbeat": {}, "rejoin": {},
        "attach": {"nonce": bytes(range(protocol.NONCE_BYTES))},
        "attached": {"max_held": 16},
        "slot": {"epoch": 0, "index": 3, "slot": 7, "gen": 2, "rows": 16},
        "release": {"slots": [[7, 2], [1, 9]]},
    }
    assert set(examples) == set(protocol.SCHEMAS)
    for mtype, fields in examples.items():
        msg = decode(encode(mtype, fields))
        assert msg.type == mtype
        assert msg.fields == fields


@pytest.mark.parametrize("dtype", ALLOWED)
def test_arrays_of_every_allowed_dtype_round_trip_as_views(dtype):
    a = sample_array(dtype, (3, 4))
    b = sample_array(dtype, (5,))
    frames = encode("batch", {"epoch": 0, "index": 1}, [("x", a), ("y", b)])
    assert len(frames) == 3
    # encode hands out the arrays' own buffers, not copies
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), a)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), b)

    wire = [bytes(frames[0]), bytearray(frames[1]), bytearray(frames[2])]
    msg = decode(wire)
    assert list(msg.arrays) == ["x", "y"]
    x, y = msg.arrays["x"], msg.arrays["y"]
    assert x.dtype == a.dtype and x.shape == a.shape
    assert y.dtype == b.dtype and y.shape == b.shape
    np.testing.assert_array_equal(x, a)
    np.testing.assert_array_equal(y, b)
    # decoded arrays are views on the received frames: no copy after the socket
    for arr, frame in ((x, wire[1]), (y, wire[2])):
        assert not arr.flags.owndata
        assert np.shares_memory(arr, np.frombuffer(frame, np.uint8))
    wire[1][:] = bytes(len(wire[1]))  # writing the frame shows through the decoded array
    assert not x.any()


def test_non_contiguous_and_empty_arrays_round_trip():
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    strided = base[::2, 1::3]
    fortran = np.asfortranarray(base.astype(np.float64))
    empty = np.zeros((0, 7), np.uint8)
    frames = encode("batch", {"epoch": 0, "index": 0}, [("s", strided), ("f", fortran), ("e", empty)])
    msg = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(msg.arrays["s"], strided)
    np.testing.assert_array_equal(msg.arrays["f"], fortran)
    assert msg.arrays["e"].shape == (0, 7) and msg.arrays["e"].dtype == np.uint8


def test_zero_dim_array_keeps_its_shape():
    """A 0-d array (one label, one scalar) must come back 0-d, not as shape (1,)."""
    scalar = np.array(5, np.int16)
    msg = decode([bytes(f) for f in encode("batch", {"epoch": 0, "index": 0}, [("z", scalar)])])
    assert msg.arrays["z"].shape == ()
    assert msg.arrays["z"] == 5


def test_encode_header_matches_encode():
    arr = sample_array("<f4", (2, 3))
    raw = protocol.encode_header("batch", {"epoch": 4, "index": 2}, [protocol.ArraySpec.of("x", arr)])
    msg = decode([raw, arr.tobytes()])
    assert msg["epoch"] == 4 and msg["index"] == 2
    np.testing.assert_array_equal(msg.arrays["x"], arr)


def test_decode_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    arr = sample_array("<i8", (4,))
    frames = [zmq.Frame(bytes(f)) for f in encode("batch", {"epoch": 0, "index": 0}, [("x", arr)])]
    msg = decode(frames)
    np.testing.assert_array_equal(msg.arrays["x"], arr)
    assert not msg.arrays["x"].flags.owndata


def test_allowed_restricts_message_types():
    frames = encode("task", {"task": 1, "dataset": "train", "epoch": 0, "index": 0, "slot": 0})
    with pytest.raises(ProtocolError, match="'task' is not accepted"):
        decode(frames, allowed=frozenset({"hello", "request"}))
    assert decode(frames, allowed=frozenset({"task"})).type == "task"


# ---------------------------------------------------------------------------------------------
# Rejections: each is a ProtocolError whose message names the problem


def rejects(frames, *needles: str) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    text = str(info.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_rejects_empty_message():
    rejects([], "empty")


@pytest.mark.parametrize("raw", [b"\xc1\xff\x00garbage", b"", b"\x92\x01", b"\x81\xa1v\x01trailing"],
                         ids=["reserved-byte", "empty-header", "truncated", "extra-data"])
def test_rejects_header_that_is_not_msgpack(raw):
    rejects([raw], "msgpack")


def test_rejects_random_bytes_header():
    rng = np.random.default_rng(0)
    for _ in range(50):
        raw = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        with pytest.raises(ProtocolError):
            decode([raw])


@pytest.mark.parametrize("value, kind", [([1, 2], "list"), (7, "int"), ("hello", "str"),
                                         (b"\x00", "bytes"), (None, "NoneType")])
def test_rejects_header_that_is_not_a_map(value, kind):
    rejects([msgpack.packb(value, use_bin_type=True)], "must be a msgpack map", kind)


def test_rejects_map_with_non_string_keys():
    rejects([msgpack.packb({1: 2}, use_bin_type=True)], "msgpack")


@pytest.mark.parametrize("version", [0, 2, "1", None, [1]])
def test_rejects_wrong_version(version):
    h = {"type": "ping"} if version is None else {"v": version, "type": "ping"}
    rejects([header(h)], "version", repr(version))


@pytest.mark.parametrize("mtype", ["frobnicate", "", None, 5, "PING"])
def test_rejects_unknown_type(mtype):
    h = {"v": 1} if mtype is None else {"v": 1, "type": mtype}
    rejects([header(h)], "unknown message type", repr(mtype))


@pytest.mark.parametrize("mtype, fields, missing", [
    ("request", {"epoch": 0}, "batches"),
    ("request", {"batches": [0]}, "epoch"),
    ("hello", {}, "dataset"),
    ("cancel", {}, "keep_epoch"),
    ("error", {"code": "x"}, "message"),
    ("welcome", {"dataset": "t", "num_samples": 1, "batch_size": 1, "batches": 1}, "specs"),
])
def test_rejects_missing_field(mtype, fields, missing):
    rejects([header(valid(mtype, **fields))], "lacks field", f"'{missing}'", f"'{mtype}'")


@pytest.mark.parametrize("mtype, fields, bad", [
    ("request", {"epoch": "1", "batches": [0]}, "epoch"),
    ("request", {"epoch": -1, "batches": [0]}, "epoch"),
    ("request", {"epoch": 1.0, "batches": [0]}, "epoch"),
    ("request", {"epoch": True, "batches": [0]}, "epoch"),
    ("request", {"epoch": 1 << 62, "batches": [0]}, "epoch"),
    ("request", {"epoch": 0, "batches": [-1]}, "batches"),
    ("request", {"epoch": 0, "batches": []}, "batches"),
    ("request", {"epoch": 0, "batches": 3}, "batches"),
    ("request", {"epoch": 0, "batches": [True, False]}, "batches"),
    ("request", {"epoch": 0, "batches": ["0"]}, "batches"),
    ("request", {"epoch": 0, "batches": list(range(protocol.MAX_CREDIT + 1))}, "batches"),
    ("request", {"epoch": 0, "batches": [0], "wait_s": -1.0}, "wait_s"),
    ("request", {"epoch": 0, "batches": [0], "wait_s": True}, "wait_s"),
    ("request", {"epoch": 0, "batches": [0], "wait_s": float("nan")}, "wait_s"),
    ("hello", {"dataset": "train", "shard": [3, 2]}, "shard"),
    ("hello", {"dataset": "train", "shard": [2, 2]}, "shard"),
    ("hello", {"dataset": "train", "shard": [0]}, "shard"),
    ("hello", {"dataset": "train", "shard": [False, True]}, "shard"),
    ("hello", {"dataset": "train", "shard": [-1, 2]}, "shard"),
    ("hello", {"dataset": ""}, "dataset"),
    ("hello", {"dataset": "x" * (protocol.MAX_NAME + 1)}, "dataset"),
    ("hello", {"dataset": b"train"}, "dataset"),
    ("hello", {"dataset": 7}, "dataset"),
    ("cancel", {"keep_epoch": False}, "keep_epoch"),
    ("stats_reply", {"stats": [1, 2]}, "stats"),
    ("error", {"code": "x", "message": "y" * (16 * 1024 + 1)}, "message"),
    ("done", {"task": 1, "rows": 2, "busy_s": "fast"}, "busy_s"),
])
def test_rejects_wrong_field_type(mtype, fields, bad):
    rejects([header(valid(mtype, **fields))], "invalid", f"'{bad}'", f"'{mtype}'")


ARRAY_SPEC_ERROR = "'arrays' must list"


@pytest.mark.parametrize("spec", [
    ["x", "|O", [2]],
    ["x", np.dtype(object).str, [2]],
    ["x", np.dtype([("a", "<i4"), ("b", "<f4")]).str, [2]],  # structured: '|V8'
    ["x", "|V4", [2]],
    ["x", "<U4", [2]],
    ["x", "|S4", [2]],
    ["x", "<M8[s]", [2]],
    ["x", ">f4", [2]],  # non-native byte order
    ["x", "float32", [2]],  # a name, not the array-protocol string
    ["x", "<f4", [1] * (protocol.MAX_NDIM + 1)],
    ["x", "<f4", [-1]],
    ["x", "<f4", [1.5]],
    ["x", "<f4", [True]],
    ["x", "<f4", 2],
    ["", "<f4", [2]],
    ["x", "<f4"],
    "x",
])
def test_rejects_bad_array_spec(spec):
    rejects([header(valid("ping", arrays=[spec])), b"\x00" * 8], ARRAY_SPEC_ERROR)


@pytest.mark.parametrize("dtype", [
    np.dtype([("a", "<i4"), ("b", "<f4")]).descr,  # structured dtype in its list form
    {"names": ["a"], "formats": ["<i4"]},  # structured dtype in its dict form
    ["<f4"],
], ids=["descr-list", "dict", "list"])
def test_rejects_structured_dtype_given_as_container(dtype):
    """A dtype that is a list or map (as numpy and msgpack-numpy write structured dtypes) is not
    one of the allowed strings; it must be refused like any other, not crash the decoder."""
    rejects([header(valid("ping", arrays=[["x", dtype, [1]]])), b"\x00" * 8], ARRAY_SPEC_ERROR)


def test_rejects_too_many_arrays():
    specs = [[f"a{i}", "|u1", [1]] for i in range(protocol.MAX_ARRAYS + 1)]
    rejects([header(valid("ping", arrays=specs)), *([b"\x00"] * len(specs))], ARRAY_SPEC_ERROR)


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 20, 1 << 20, 1 << 10], [(1 << 62) - 1] * 8])
def test_rejects_huge_declared_shape_before_touching_frames(shape):
    text = rejects([header(valid("ping", arrays=[["x", "<f8", shape]])), b""], "declares", "limit", "'x'")
    assert str(protocol.MAX_ARRAY_BYTES) in text


@pytest.mark.parametrize("shape", [[0, 1 << 61], [1 << 40, 0, 1 << 40], [0] + [(1 << 62) - 1] * 7])
def test_rejects_empty_array_whose_other_dimensions_overflow(shape):
    """Zero bytes, but numpy refuses to shape it ("array is too big", a plain ValueError), so
    the decoder must refuse it itself: found by fuzzing a live server (tests/live/test_fuzz_live.py)."""
    rejects([header(valid("ping", arrays=[["x", "<f8", shape]])), b""], "declares", "shape", "'x'", "limit")


@pytest.mark.parametrize("extra", [-1, 1])
def test_rejects_frame_count_mismatch(extra):
    specs = [["x", "<i4", [2]], ["y", "<i4", [2]]]
    frames = [b"\x00" * 8] * (2 + extra)
    text = rejects([header(valid("batch", epoch=0, index=0, arrays=specs)), *frames], "frames")
    assert f"{2 + extra} frames" in text


def test_rejects_frames_without_arrays_spec():
    rejects([header(valid("ping")), b"surprise"], "0 arrays", "1 frames")


@pytest.mark.parametrize("length", [0, 11, 13, 24])
def test_rejects_frame_length_mismatch(length):
    h = header(valid("batch", epoch=0, index=0, arrays=[["x", "<f4", [3]]]))
    rejects([h, b"\x00" * length], "'x'", "12 bytes", f"{length}")


@pytest.mark.parametrize("ext", [msgpack.ExtType(1, b"payload"), msgpack.ExtType(127, b""),
                                 msgpack.ExtType(42, b"\x80\x03cbuiltins\nopen\n")])
def test_rejects_ext_type_anywhere_in_header(ext):
    rejects([header(valid("ping", nested={"deep": [ext]}))], "extension type")
    rejects([header(valid("request", epoch=0, batches=ext))], "extension type")
    rejects([header(ext)], "extension type")


def test_rejects_reserved_negative_ext_type():
    raw = b"\x81\xa1x\xd6\xfb\x00\x00\x00\x00"  # {"x": ext type -5, 4 bytes}
    rejects([raw], "extension type")


def test_rejects_timestamp_extension():
    """msgpack decodes extension type -1 (Timestamp) itself, without calling ext_hook. The
    module promises that msgpack's extension types are refused, so that one must be too."""
    rejects([header(valid("ping", when=msgpack.Timestamp(1, 0)))], "extension type")


def test_rejects_header_over_size_limit():
    big = header(valid("ping", padding="x" * protocol.MAX_HEADER_BYTES))
    assert len(big) > protocol.MAX_HEADER_BYTES
    rejects([big], "header", str(len(big)), str(protocol.MAX_HEADER_BYTES))
    # the limit is on the header frame: a header just under it is read
    fits = header(valid("ping", padding="x" * (protocol.MAX_HEADER_BYTES - 100)))
    assert len(fits) <= protocol.MAX_HEADER_BYTES
    assert decode([fits]).type == "ping"


def test_rejects_deeply_nested_header():
    raw = b"\x91" * 60000 + b"\x01"  # a list in a list in a list ... 60000 deep
    with pytest.raises(ProtocolError):
        decode([raw])


def test_error_messages_truncate_huge_values():
    text = rejects([header(valid("request", epoch="9" * 10000, batches=[0]))], "invalid", "'epoch'")
    assert len(text) < 300


@pytest.mark.parametrize("where", ["v", "type", "epoch"])
def test_error_messages_quote_huge_and_deep_values_briefly(where):
    """The server sends these messages back in an `error`, whose `message` the client only
    accepts up to 16 KiB; a value nested a thousand deep must not turn into a RecursionError
    from repr. Both found by fuzzing a live server (tests/live/test_fuzz_live.py)."""
    fields = {"v": protocol.VERSION, "type": "request", "epoch": 0, "batches": [0]}
    deep = b"\x91" * 1000 + b"\x00"  # [[[...[0]...]]], within msgpack's own depth limit
    raw = b"".join(header(k) + (deep if k == where else header(v)) for k, v in fields.items())
    assert len(rejects([bytes([0x80 | len(fields)]) + raw], where)) < 300
    huge = header({**fields, where: "A" * (protocol.MAX_HEADER_BYTES - 100)})
    assert len(rejects([huge], where)) < 300


# ---------------------------------------------------------------------------------------------
# Properties: nothing but a Message or a ProtocolError ever comes out of decode


leaves = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
          | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
frame_bytes = st.binary(max_size=256)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_protocol_error(frames):
    try:
        msg = decode(frames)
    except ProtocolError:
        return None
    assert isinstance(msg, protocol.Message)
    assert msg.type in protocol.SCHEMAS
    return msg


@PROPERTY
@given(st.lists(frame_bytes, max_size=5))
def test_decode_of_arbitrary_frames(frames):
    decode_or_protocol_error(frames)


@PROPERTY
@given(st.dictionaries(st.text(max_size=10), values, max_size=8), st.lists(frame_bytes, max_size=3))
def test_decode_of_arbitrary_msgpack_map(fields, frames):
    decode_or_protocol_error([header(fields), *frames])


spec_entries = st.lists(st.one_of(
    st.text(max_size=5), st.sampled_from(ALLOWED + ["|O", "|V4"]), values,
    st.lists(st.integers(-2, 1 << 40), max_size=9)), min_size=0, max_size=4)


@PROPERTY
@given(st.sampled_from(sorted(protocol.SCHEMAS)),
       st.dictionaries(st.sampled_from(sorted({k.rstrip("?") for s in protocol.SCHEMAS.values() for k in s})),
                       values, max_size=6),
       st.one_of(st.none(), values, st.lists(spec_entries, max_size=3)),
       st.lists(frame_bytes, max_size=3))
def test_decode_of_schema_shaped_headers(mtype, fields, arrays, frames):
    """Headers that get past the version and type checks, with arbitrary field values and
    `arrays` specs, still only ever decode or raise ProtocolError."""
    h = valid(mtype, **fields)
    if arrays is not None:
        h["arrays"] = arrays
    decode_or_protocol_error([header(h), *frames])


@PROPERTY
@given(st.sampled_from(ALLOWED), st.lists(st.integers(0, 4), min_size=1, max_size=4), st.data())
def test_array_round_trip_property(dtype, shape, data):
    arr = sample_array(dtype, tuple(shape))
    frames = [bytes(f) for f in encode("batch", {"epoch": 0, "index": 0}, [("x", arr)])]
    msg = decode(frames)
    np.testing.assert_array_equal(msg.arrays["x"], arr)
    assert msg.arrays["x"].dtype == arr.dtype
    # cutting or growing the frame by any amount is always caught
    delta = data.draw(st.integers(-len(frames[1]), 16).filter(lambda d: d != 0))
    bad = frames[1][:len(frames[1]) + delta] if delta < 0 else frames[1] + b"\x00" * delta
    with pytest.raises(ProtocolError, match="declares"):
        decode([frames[0], bad])


# ---------------------------------------------------------------------------------------------
# The vocabulary by direction, ArraySpec, clip, and the tables that answer each direction


def test_the_four_directions_make_up_the_whole_vocabulary():
    directions = [protocol.CLIENT_TO_SERVER, protocol.SERVER_TO_CLIENT, protocol.WORKER_TO_BROKER,
                  protocol.BROKER_TO_WORKER]
    assert set().union(*directions) == set(protocol.SCHEMAS)
    assert not protocol.CLIENT_TO_SERVER & (protocol.SERVER_TO_CLIENT | protocol.WORKER_TO_BROKER
                                            | protocol.BROKER_TO_WORKER), "no client message is another's"
    assert protocol.WORKER_TO_BROKER & protocol.BROKER_TO_WORKER == {"heartbeat"}, "both sides heartbeat"


def test_array_spec_keeps_the_wire_format_of_name_dtype_shape_lists():
    spec = protocol.ArraySpec.from_wire(["x", "<f4", [16, 3]])
    assert spec == protocol.ArraySpec("x", "<f4", (16, 3)) == ("x", "<f4", (16, 3))
    assert spec.to_wire() == ["x", "<f4", [16, 3]]
    assert spec.batched(8) == ("x", "<f4", (8, 16, 3)) and spec.nbytes == 16 * 3 * 4
    raw = protocol.encode_header("batch", {"epoch": 0, "index": 0}, [spec.batched(0)])
    assert msgpack.unpackb(raw)["arrays"] == [["x", "<f4", [0, 16, 3]]]


def test_clip_fits_a_field_in_bytes_keeping_the_head_or_the_tail():
    text = "start " + "é" * 20_000 + " end"
    head, tail = protocol.clip(text), protocol.clip(text, tail=True)
    for cut in (head, tail):
        assert len(cut.encode()) <= protocol.MAX_TEXT, "non-ASCII text fits the byte limit too"
        assert "bytes cut" in cut
    assert head.startswith("start ") and tail.endswith(" end")
    assert protocol.clip("short") == "short"
    # a file name's undecodable bytes (lone surrogates) become text msgpack can send
    assert decode(encode("failed", {"task": 1, "message": protocol.clip("bad-\udcff.npy")}))["message"] == \
        "bad-\\udcff.npy"


def test_each_handler_table_covers_exactly_its_direction(monkeypatch):
    import zmq

    from loader_client.stream import Connection
    from loader_server.serve.broker import Broker
    from loader_server.worker.loop import WorkerLoop

    broker = Broker({}, None, None, None, None)
    assert set(broker._client_handlers) == protocol.CLIENT_TO_SERVER
    assert set(broker._worker_handlers) == protocol.WORKER_TO_BROKER

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    loop = WorkerLoop(ctx, sock, None, [], 1.0)
    try:
        assert set(loop._handlers) == protocol.BROKER_TO_WORKER
    finally:
        loop.close()
        sock.close(0)
        ctx.term()

    monkeypatch.setattr(Connection, "_handshake", lambda self: None)  # no server to greet
    conn = Connection("tcp://127.0.0.1:9", timeout=1)
    try:
        assert set(conn._handlers) == protocol.SERVER_TO_CLIENT
    finally:
        conn.close()


def test_a_failed_batch_carries_the_innermost_frames_and_the_client_shows_them_like_torch():
    from loader_client.stream import error_text
    from loader_server.worker.loop import short_traceback

    def innermost_op(depth: int) -> None:
        if depth:
            innermost_op(depth - 1)
        raise ValueError("bad sample " + "x" * 40_000)

    try:
        try:
            innermost_op(50)
        except ValueError as e:
            raise RuntimeError("sample 7 (part-000.npy row 7): augment op 'pkg:op' failed") from e
    except RuntimeError as e:
        tb = short_traceback(e)
    assert len(tb.encode()) <= protocol.MAX_TEXT
    assert "in innermost_op" in tb and tb.rstrip().endswith("augment op 'pkg:op' failed"), tb[-300:]
    assert tb.count("in innermost_op") <= 8, "only the last frames of a deep stack"
    reply = decode(encode("error", {"code": "batch_failed", "message": "worker local-0 failed: boom",
                                    "epoch": 0, "index": 1, "traceback": tb}))
    text = error_text(reply)
    assert text.startswith("worker local-0 failed: boom\n\nOriginal Traceback (most recent call last):\n")
    assert "in innermost_op" in text
    plain = decode(encode("error", {"code": "out_of_range", "message": "batch 99 is out of range"}))
    assert error_text(plain) == "batch 99 is out of range"
