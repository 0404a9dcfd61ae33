"""Property-based fuzzing of live endpoints (issue 7, "Bad input on the wire").

`test_wire_safety.py` sends hand-picked hostile messages to a server, and `test_protocol.py`
fuzzes `protocol.decode` alone. Here hypothesis builds the hostile traffic and sends it to a
real `npyloader serve`, on both of its endpoints (clients, and workers joining over tcp), and
to a real client from a fake server. The properties:

- the server answers every malformed client message with a well-formed `error` and nothing
  else (which messages are malformed, the test knows from how it generated them and its own
  reading of the contract, never from the decoder under test), answers nothing a worker would
  not expect, never reaches pickle, never counts a
  `validator_error` (an exception other than ProtocolError: a validator bug), retires a fake
  worker that went silent, and after every case still serves a normal client correct batches;
  its memory stays flat under sustained hostile traffic and its one worker is never replaced;
- a client fed hostile replies never unpickles, keeps its I/O thread, and ends every wait with
  the batch, a ServerError or ValueError naming the server, or a TimeoutError naming it.

One server serves the whole module (starting one per case would dominate the runtime); its
heartbeat is short so that a fake worker that registered and went silent is retired quickly.
"""

from __future__ import annotations

import math
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_client import protocol
from loader_client.stream import Connection, DatasetInfo, ServerError, request_stats
from tests.helpers import (
    ServerProcess,
    dealer,
    launch,
    monitored_dealer,
    pickle_bomb,
    rss_kb,
    serve_command,
    wait_for,
    write_id_dataset,
)

NUM_SAMPLES = 203
BATCH = 16
NUM_BATCHES = 13
FEATURES = 16
HEARTBEAT_S = 0.3
REPLY_TIMEOUT_S = 10.0
# A fake worker silent for 3 heartbeats is retired at the next heartbeat tick after that.
RETIRE_TIMEOUT_S = 10.0

# The server's MAXMSGSIZE per endpoint (loader_server/server.py): requests on the client
# endpoint, and on the worker endpoint one whole batch (float32 x and y) plus the same margin.
CLIENT_MAXMSGSIZE = protocol.MAX_REQUEST_BYTES
WORKER_MAXMSGSIZE = BATCH * (FEATURES + 1) * 4 + protocol.MAX_REQUEST_BYTES

CLIENT_MESSAGES, WORKER_MESSAGES = protocol.CLIENT_TO_SERVER, protocol.WORKER_TO_BROKER
TO_CLIENT, TO_WORKER = protocol.SERVER_TO_CLIENT, protocol.BROKER_TO_WORKER
ERROR_CODES = frozenset({"bad_message", "unknown_client", "unknown_dataset", "out_of_range",
                         "credit_exceeded", "batch_failed", "shm_refused", "bad_release"})

# Server RSS may grow this much from the warm-up measurement to the end of the module. Measured
# on the 2-core dev VM: 70 MB at start, 72.6 MB after the warm-up, then +0.3 MB over the three
# bulk rounds (about 2,500 hostile messages and 600 frames of 1 MiB). The bound leaves room for
# allocator and ZeroMQ buffer growth elsewhere, and still catches a server that keeps received
# frames (hundreds of MB here) or about 8 KB of state per hostile message.
RSS_GROWTH_LIMIT_KB = 20 * 1024

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def fuzz(examples: int) -> settings:
    """Each case costs socket round trips and a check against the live server, so every test
    sizes its own example count to keep the module near a minute on two slow cores."""
    return settings(FUZZ, max_examples=examples)


Frames = list[bytes]


# ---------------------------------------------------------------------------------------------
# The live server


@dataclass
class Live:
    """The module's server, a persistent normal client, the pickle marker, and RSS readings."""

    server: ServerProcess
    marker: Path
    check: Connection
    worker_pid: int
    rss_kb: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    validator_errors: int = 0
    sent: int = 0  # hostile messages, probes left out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`npyloader serve` with one local worker and a tcp worker endpoint, for the whole module;
    stopped at teardown, pass or fail (ServerProcess.stop also waits for its worker to exit)."""
    tmp = tmp_path_factory.mktemp("fuzz-live")
    assert write_id_dataset(tmp / "ids", [50, 37, 41, 60, 15]) == NUM_SAMPLES
    log_path = tmp / "server.log"
    argv = serve_command("serve", "--data", str(tmp / "ids" / "*.npy"), "--label-column", "-1",
                         "--batch-size", str(BATCH), "--workers", "1", "--bind", "tcp://127.0.0.1:0",
                         "--worker-bind", "tcp://127.0.0.1:0", "--heartbeat", str(HEARTBEAT_S),
                         "--no-index-cache")
    server = ServerProcess(launch(argv, log_path), log_path)
    check = None
    try:
        server.wait_ready()
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, 60, "the local worker")
        [worker_pid] = server.workers()
        check = Connection(server.endpoint, timeout=REPLY_TIMEOUT_S)
        live = Live(server, tmp / "pwned", check, worker_pid)
        live.rss_kb["start"] = rss_kb(server.proc.pid)
        yield live
    finally:
        if check is not None:
            check.close()
        server.stop()


def assert_still_serving(live: Live) -> None:
    """The server is alive, has retired every fake worker, still has its one original worker,
    serves the persistent client a correct batch (a fresh (epoch, index) each time, so nothing
    cached), and answers stats. Nothing reached pickle."""
    server = live.server
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode}):\n{server.log()[-3000:]}"
    assert not live.marker.exists(), "a payload was unpickled"

    def only_the_local_worker() -> dict | None:
        stats = request_stats(server.endpoint, timeout=REPLY_TIMEOUT_S)
        return stats if stats["workers"]["ready"] == 1 else None

    stats = wait_for(only_the_local_worker, RETIRE_TIMEOUT_S, "fake workers to be retired")
    [worker] = stats["workers"]["list"]
    assert worker["local"] and worker["pid"] == live.worker_pid, stats["workers"]
    assert stats["workers"]["respawns"] == 0, stats["workers"]
    # counted per case (the server's counter is cumulative), so each failing case is pinned down
    before, live.validator_errors = live.validator_errors, stats["rejected"].get("validator_error", 0)
    assert live.validator_errors == before, (
        f"decode raised something other than ProtocolError: {stats['rejected']}\n{server.log()[-3000:]}")

    epoch, index = live.checks, live.checks % NUM_BATCHES
    x, y = live.check.get(epoch, index)
    assert_batch_content(x, y, index)
    live.checks += 1


def assert_batch_content(x: np.ndarray, y: np.ndarray, index: int) -> None:
    """The id dataset's label is the sample id and its features are a function of it."""
    rows = BATCH if index < NUM_BATCHES - 1 else NUM_SAMPLES - BATCH * (NUM_BATCHES - 1)
    assert x.shape == (rows, FEATURES) and y.shape == (rows,), (x.shape, y.shape)
    ids = y.astype(np.int64)
    assert len(set(ids.tolist())) == rows and ids.min() >= 0 and ids.max() < NUM_SAMPLES, ids
    expected = (ids[:, None] * 1000 + np.arange(FEATURES)[None, :]) % 9973
    np.testing.assert_array_equal(x, expected.astype(x.dtype))


def receive(sock: zmq.Socket, server: ServerProcess, allowed: frozenset[str],
            max_header_bytes: int = protocol.MAX_HEADER_BYTES) -> protocol.Message:
    """The server's next message, which must itself follow the contract."""
    wait_for(lambda: sock.poll(50) or server.proc.poll() is not None, REPLY_TIMEOUT_S, "a reply from the server")
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode}):\n{server.log()[-3000:]}"
    frames = sock.recv_multipart()
    try:
        return protocol.decode(frames, allowed=allowed, max_header_bytes=max_header_bytes)
    except protocol.ProtocolError as e:
        raise AssertionError(f"the server sent a message that breaks the contract ({e}): {frames[0][:200]!r}") from e


# ---------------------------------------------------------------------------------------------
# What the server must make of each generated message. The expectation comes from how the
# message was generated and the test's own reading of the wire contract below, never from
# protocol.decode: the server runs that same decoder, so asking it would make the code under
# test its own oracle (a message it wrongly accepted would be expected to be accepted).


@dataclass(frozen=True)
class Sent:
    """A generated message: its frames, and the header object the generator packed into the
    first one, or None for bytes built to be malformed whatever any schema says (not a msgpack
    map, an extension type, a pickle, a stray frame)."""

    frames: Frames
    header: Any = None


# Field kinds of every type the server's two endpoints accept, written out from the design's
# wire contract rather than imported from protocol.SCHEMAS. A trailing "?" marks an optional
# field; fields not listed are ignored (a newer peer may add some).
CONTRACT: dict[str, dict[str, str]] = {
    "hello": {"dataset": "name", "shard?": "shard"},
    "request": {"epoch": "nonneg", "batches": "indices", "wait_s?": "seconds", "release?": "releases"},
    "attach": {"nonce": "nonce"},
    "release": {"slots": "releases"},
    "cancel": {"keep_epoch": "nonneg"},
    "ping": {}, "stats": {}, "bye": {},
    "join": {"pid": "nonneg", "host": "text"},
    "ready": {"worker?": "nonneg", "pid": "nonneg", "host": "text", "capacity?": "nonneg", "local?": "bool"},
    "refused": {"message": "text"},
    "heartbeat": {},
    "done": {"task": "nonneg", "rows": "nonneg", "busy_s": "seconds", "read_s?": "seconds", "augment_s?": "seconds"},
    "failed": {"task": "nonneg", "message": "text", "traceback?": "text"},
}
assert CONTRACT.keys() == CLIENT_MESSAGES | WORKER_MESSAGES
# "Only plain numeric and bool dtypes cross the wire", as numpy spells them (`dtype.str`).
PLAIN_DTYPES = frozenset(np.dtype(t).str for t in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128"))


def _nonneg(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 62


KINDS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str) and 0 < len(v) <= protocol.MAX_NAME,
    "text": lambda v: isinstance(v, str) and len(v) <= protocol.MAX_TEXT,
    "nonneg": _nonneg,
    "seconds": lambda v: type(v) in (int, float) and 0 <= v < math.inf,
    "bool": lambda v: type(v) is bool,
    "shard": lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_nonneg, v))
                                     and v[0] < v[1]),
    "indices": lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= protocol.MAX_CREDIT
    and all(map(_nonneg, v)),
    "nonce": lambda v: isinstance(v, bytes) and len(v) == 16,
    "releases": lambda v: isinstance(v, (list, tuple)) and len(v) <= protocol.MAX_CREDIT and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(map(_nonneg, p)) for p in v),
}


def _msgpack_max_depth() -> int:
    """How deep msgpack itself nests containers before refusing a message (the library's
    limit, not the server's): found by asking it, once."""
    low, high = 1, 1 << 14
    while low < high:
        mid = (low + high + 1) // 2
        try:
            msgpack.unpackb(b"\x91" * mid + b"\x00")
            low = mid
        except Exception:  # noqa: BLE001 - msgpack's StackError, whatever the version names it
            high = mid - 1
    return low


MSGPACK_MAX_DEPTH = _msgpack_max_depth()


def nesting(obj: Any) -> int:
    """How many containers deep `obj` goes (a flat map is 1), counted without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def arrays_conform(specs: Any, frames: Frames) -> bool:
    """`arrays` lists [name, dtype, shape] per following frame: a name, a plain dtype, at most
    MAX_NDIM non-negative dimensions, at most MAX_ARRAY_BYTES (zero dimensions counted as 1),
    and a frame of exactly the declared length."""
    if not isinstance(specs, (list, tuple)) or len(specs) > protocol.MAX_ARRAYS or len(specs) != len(frames):
        return False
    for spec, frame in zip(specs, frames):
        if not (isinstance(spec, (list, tuple)) and len(spec) == 3):
            return False
        name, dtype, shape = spec
        if not (KINDS["name"](name) and isinstance(dtype, str) and dtype in PLAIN_DTYPES
                and isinstance(shape, (list, tuple)) and len(shape) <= protocol.MAX_NDIM and all(map(_nonneg, shape))):
            return False
        extent = np.dtype(dtype).itemsize
        for d in shape:
            extent *= max(d, 1)
        if extent > protocol.MAX_ARRAY_BYTES or len(frame) != (0 if 0 in shape else extent):
            return False
    return True


def contract_type(sent: Sent, accepted: frozenset[str]) -> str | None:
    """The type an endpoint accepting `accepted` must take `sent` for, or None when it must
    answer `bad_message`: a header map within the size limit and msgpack's nesting, version 1,
    an accepted type, its fields of the right kinds, and its arrays as declared."""
    header, frames = sent.header, sent.frames
    if not isinstance(header, dict) or len(frames[0]) > protocol.MAX_HEADER_BYTES:
        return None
    if nesting(header) > MSGPACK_MAX_DEPTH:
        return None
    version, mtype = header.get("v"), header.get("type")
    if type(version) is not int or version != protocol.VERSION or not isinstance(mtype, str) or mtype not in accepted:
        return None
    for key, kind in CONTRACT[mtype].items():
        name = key.rstrip("?")
        if name in header:
            if not KINDS[kind](header[name]):
                return None
        elif not key.endswith("?"):
            return None
    return mtype if arrays_conform(header.get("arrays", []), frames[1:]) else None


def send_case_to_clients_endpoint(live: Live, case: list[Sent]) -> None:
    """Send a case on a fresh DEALER, then `stats` as a probe: the probe's reply proves the server
    handled every message before it. Each malformed message must get exactly one `bad_message`
    error, and every reply must follow the contract."""
    kinds = [contract_type(sent, CLIENT_MESSAGES) for sent in case]
    malformed = kinds.count(None)
    live.sent += len(case)
    with dealer(live.server.endpoint) as sock:
        for sent in case:
            sock.send_multipart(sent.frames)
        sock.send_multipart(protocol.encode("stats"))
        stats_replies = bad = 0
        while stats_replies < kinds.count("stats") + 1:
            # stats list every client and worker, so they may outgrow an ordinary header
            msg = receive(sock, live.server, TO_CLIENT, protocol.MAX_SETUP_BYTES)
            if msg.type == "stats_reply":
                stats_replies += 1
            elif msg.type == "error":
                assert msg["code"] in ERROR_CODES, msg
                bad += msg["code"] == "bad_message"
        assert bad == malformed, f"{malformed} malformed message(s) got {bad} bad_message error(s): {kinds}"


def send_case_to_workers_endpoint(live: Live, case: list[Sent]) -> None:
    with dealer(live.server.worker_endpoint) as sock:
        send_as_worker(sock, live, case)


def send_as_worker(sock: zmq.Socket, live: Live, case: list[Sent]) -> None:
    """Send a case as a would-be worker, then `join` as a probe: its `setup` proves the server
    handled every message before it, and every well-formed `join` gets a `setup` too. Whatever
    comes back is something a worker expects."""
    joins = sum(contract_type(sent, WORKER_MESSAGES) == "join" for sent in case)
    live.sent += len(case)
    for sent in case:
        sock.send_multipart(sent.frames)
    sock.send_multipart(protocol.encode("join", {"pid": 1, "host": "fuzz"}))
    setups = 0
    while setups < joins + 1:
        msg = receive(sock, live.server, TO_WORKER, protocol.MAX_SETUP_BYTES)
        setups += msg.type == "setup"


def send_oversized(endpoint: str, server: ServerProcess, frames: Frames) -> None:
    """A message over the endpoint's MAXMSGSIZE: ZeroMQ drops that connection, nothing else."""
    with monitored_dealer(endpoint) as (sock, next_event):
        assert next_event() == zmq.EVENT_CONNECTED
        sock.send_multipart(frames)
        assert next_event() == zmq.EVENT_DISCONNECTED
        assert server.proc.poll() is None, server.log()[-3000:]


# ---------------------------------------------------------------------------------------------
# Strategies: hostile messages, each a Sent (frames and the header they were packed from)


def packb(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def packed(header: dict, *frames: bytes) -> Sent:
    """A message whose header this test built as an object (and packed itself)."""
    return Sent([packb(header), *frames], header)


def message(mtype: str, fields: dict, arrays: Sequence[tuple[str, np.ndarray]] = ()) -> Sent:
    """A message of `mtype` with `fields` and `arrays` (each its own frame, as the contract
    says), packed by the test itself rather than by protocol.encode."""
    header = {"v": protocol.VERSION, "type": mtype, **fields}
    if arrays:
        header["arrays"] = [[name, a.dtype.str, list(a.shape)] for name, a in arrays]
    return packed(header, *(a.tobytes() for _, a in arrays))


def wire(frames: list) -> Frames:
    return [bytes(f) for f in frames]


leaves = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=True)
          | st.text(max_size=12) | st.binary(max_size=12))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
huge_text = st.integers(protocol.MAX_NAME, protocol.MAX_HEADER_BYTES + 100).map(lambda n: "A" * n)
not_version = (st.sampled_from([0, 2, -1, 255, 1 << 63, "1", b"\x01", [1], {"v": 1}, None, 1.5])
               | values.filter(lambda v: v != protocol.VERSION) | huge_text)

epochs = st.integers(0, 3) | st.just((1 << 62) - 1)
indices = st.integers(0, NUM_BATCHES + 2) | st.just((1 << 62) - 1)
nonneg = st.integers(0, 4) | st.sampled_from([(1 << 31), (1 << 62) - 1])
seconds = st.floats(0, 1e9) | st.just(float("inf"))
names = st.sampled_from(["train", "nope", "x" * protocol.MAX_NAME])
texts = st.text(max_size=30) | st.just("t" * (16 * 1024))
shards = st.tuples(st.sampled_from([1, 2, 3, 200, 204, (1 << 62) - 1]), st.integers(0, 3)).map(
    lambda wr: [min(wr[1], wr[0] - 1), wr[0]])

# Well-formed messages of every type each endpoint accepts, with edge values in range.
VALID_TO_CLIENTS_ENDPOINT = {
    "hello": st.fixed_dictionaries({"dataset": names}, optional={"shard": st.none() | shards}),
    "request": st.fixed_dictionaries({"epoch": epochs, "batches": st.lists(indices, min_size=1, max_size=40)},
                                     optional={"wait_s": seconds}),
    "cancel": st.fixed_dictionaries({"keep_epoch": epochs}),
    "ping": st.just({}), "stats": st.just({}), "bye": st.just({}),
    "attach": st.fixed_dictionaries({"nonce": st.binary(min_size=protocol.NONCE_BYTES, max_size=protocol.NONCE_BYTES)}),
    "release": st.fixed_dictionaries({"slots": st.lists(st.lists(nonneg, min_size=2, max_size=2), max_size=3)}),
}
assert set(VALID_TO_CLIENTS_ENDPOINT) == CLIENT_MESSAGES

VALID_TO_WORKERS_ENDPOINT = {
    "join": st.fixed_dictionaries({"pid": nonneg, "host": texts}),
    "ready": st.fixed_dictionaries({"pid": nonneg, "host": texts},
                                   optional={"worker": nonneg, "capacity": nonneg, "local": st.booleans()}),
    "refused": st.fixed_dictionaries({"message": texts}),
    "heartbeat": st.just({}),
    "done": st.fixed_dictionaries({"task": nonneg, "rows": nonneg, "busy_s": seconds}),
    "failed": st.fixed_dictionaries({"task": nonneg, "message": texts}),
}
assert set(VALID_TO_WORKERS_ENDPOINT) == WORKER_MESSAGES


def valid_message(schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[tuple[str, dict]]:
    return st.sampled_from(sorted(schemas)).flatmap(lambda t: st.tuples(st.just(t), schemas[t]))


def encoded(schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Sent]:
    return valid_message(schemas).map(lambda tf: message(tf[0], tf[1]))


small_arrays = st.tuples(
    st.sampled_from(sorted(protocol.ALLOWED_DTYPES)),
    st.lists(st.integers(0, 5), max_size=3),
    st.sampled_from(["x", "y", "z"]),
).map(lambda dsn: (dsn[2], np.zeros(dsn[1], dtype=dsn[0])))


def with_valid_arrays(schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Sent]:
    """Well-formed messages carrying well-formed arrays (e.g. a `done` with a made-up batch)."""
    return st.tuples(valid_message(schemas), st.lists(small_arrays, min_size=1, max_size=3)).map(
        lambda m: message(m[0][0], m[0][1], m[1]))


def wrong_types(types: list[str]) -> st.SearchStrategy[Sent]:
    """The right `v` and `type`, and that type's fields (from protocol.SCHEMAS) holding
    arbitrary values, each one present or not."""
    def build(mtype: str) -> st.SearchStrategy[Sent]:
        fields = sorted(k.rstrip("?") for k in protocol.SCHEMAS[mtype])
        return st.fixed_dictionaries({}, optional={k: values | huge_text for k in fields}).map(
            lambda f: packed({"v": protocol.VERSION, "type": mtype, **f}))
    return st.sampled_from(types).flatmap(build)


dims = st.integers(0, 4) | st.sampled_from([1 << 31, 1 << 40, 1 << 61, (1 << 62) - 1, 1 << 62, -1])
dtypes = (st.sampled_from(sorted(protocol.ALLOWED_DTYPES))
          | st.sampled_from(["|O", "<U8", "|S4", "|V16", "<M8[s]", "<m8[ns]", ">f4", "f4", "float32", "",
                             "<f16", "|b1x", "O"])
          | values)
array_specs = st.lists(
    st.tuples(st.text(max_size=6) | st.just("n" * 200) | values, dtypes,
              st.lists(dims, max_size=protocol.MAX_NDIM + 2) | values).map(list) | values,
    max_size=protocol.MAX_ARRAYS + 2) | values


def declared_nbytes(spec: Any) -> int | None:
    """What a spec declares, when it is a plain one small enough to send a matching frame."""
    try:
        _, dtype, shape = spec
        itemsize = np.dtype(dtype).itemsize
        n = itemsize * int(np.prod([int(d) for d in shape], dtype=object))
    except Exception:
        return None
    return n if 0 <= n <= 4096 else None


@st.composite
def with_hostile_arrays(draw: st.DrawFn, schemas: dict[str, st.SearchStrategy]) -> Sent:
    """A well-formed header whose `arrays` lists huge, zero-size or absurd shapes and dtypes,
    followed by frames of the declared length, a random one, or the wrong number of frames."""
    mtype, fields = draw(valid_message(schemas))
    specs = draw(array_specs)
    frames = []
    for spec in specs if isinstance(specs, list) else []:
        exact = declared_nbytes(spec)
        frames.append(bytes(exact) if exact is not None and draw(st.booleans()) else draw(st.binary(max_size=40)))
    drop = draw(st.integers(0, 1)) if frames else 0
    frames = frames[drop:] + draw(st.lists(st.binary(max_size=8), max_size=1))
    return packed({"v": protocol.VERSION, "type": mtype, **fields, "arrays": specs}, *frames)


def unknown_types(accepted: frozenset[str]) -> st.SearchStrategy[Sent]:
    """Types this endpoint does not accept: other endpoints' types, made-up ones, non-strings."""
    others = sorted(set(protocol.SCHEMAS) - accepted)
    return (st.sampled_from(others) | st.text(max_size=12).filter(lambda t: t not in protocol.SCHEMAS)
            | values.filter(lambda t: not isinstance(t, str)) | huge_text).map(
        lambda t: packed({"v": protocol.VERSION, "type": t}))


def bad_versions(schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Sent]:
    """Otherwise well-formed messages whose version is wrong or absent."""
    def build(m: tuple[tuple[str, dict], Any, bool]) -> Sent:
        (mtype, fields), version, absent = m
        return packed({"type": mtype, **fields} if absent else {"v": version, "type": mtype, **fields})
    return st.tuples(valid_message(schemas), not_version, st.booleans()).map(build)


def raw_ext(code: int, data: bytes) -> bytes:
    """msgpack ext 8 bytes for any code, negative (reserved) ones included, which
    msgpack.ExtType refuses to build."""
    return b"\xc7" + bytes([len(data)]) + code.to_bytes(1, "big", signed=True) + data


exts = (st.builds(raw_ext, st.integers(-128, 127), st.binary(max_size=12))
        | st.builds(msgpack.Timestamp, st.integers(0, 1 << 32), st.integers(0, 10**9 - 1)).map(packb))


def ext_types(schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Sent]:
    """msgpack extension types (timestamps included) as the header, a field or nested deep:
    malformed by construction, since the contract refuses every extension type."""
    def build(m: tuple[tuple[str, dict], bytes, int]) -> Sent:
        (mtype, fields), ext, where = m
        if where == 0:
            return Sent([ext])
        nested = ext if where == 1 else b"\x81" + packb("a") + b"\x92" + packb(1) + b"\x81" + packb("b") + ext
        header = packb({"v": protocol.VERSION, "type": mtype, **fields})
        # one more entry in the header's map (fields stay under 15, so it is a fixmap)
        return Sent([bytes([header[0] + 1]) + header[1:] + packb("extra") + nested])
    return st.tuples(valid_message(schemas), exts, st.integers(0, 2)).map(build)


def nested_list(depth: int) -> list:
    """[[...[0]...]], `depth` lists deep, built without recursion."""
    inner: Any = 0
    for _ in range(depth):
        inner = [inner]
    return inner


def deep_nesting(types: list[str]) -> st.SearchStrategy[Sent]:
    """A field holding a list in a list in a list ..., near and past msgpack's depth limit. The
    bytes are written by hand (msgpack's packer refuses such depths); the header object beside
    them says what they encode."""
    def build(m: tuple[str, int, bool]) -> Sent:
        mtype, depth, as_type = m
        deep = b"\x91" * depth + b"\x00"
        if as_type:  # {"v": 1, "type": [[[...]]]}
            return Sent([b"\x82" + packb("v") + packb(protocol.VERSION) + packb("type") + deep])
        return Sent([b"\x83" + packb("v") + packb(protocol.VERSION) + packb("type") + packb(mtype) + packb("epoch") + deep],
                    {"v": protocol.VERSION, "type": mtype, "epoch": nested_list(depth)})
    return st.tuples(st.sampled_from(types), st.integers(1, 1100) | st.integers(900, 1030), st.booleans()).map(build)


# msgpack's map markers: fixmap, map 16, map 32
MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def random_frames(max_frames: int = 6) -> st.SearchStrategy[Sent]:
    """Random bytes whose first frame does not start a msgpack map, so the header can never be
    one: malformed by construction (maps of arbitrary content come from wrong_types)."""
    first = st.binary(max_size=300).filter(lambda b: not b or b[0] not in MAP_MARKERS)
    return st.tuples(first, st.lists(st.binary(max_size=300), max_size=max_frames - 1)).map(
        lambda m: Sent([m[0], *m[1]]))


def pickles(marker: Path, schemas: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Sent]:
    """Object arrays whose unpickling creates `marker`, in every place a careless decoder would
    look: the whole header (msgpack-numpy), a field, an `|O` array frame, an ext type, a stray
    frame, and plain pickle bytes. Only the pickle in an unknown field leaves the message
    well-formed (unknown fields are ignored, as plain msgpack maps and bytes); the object array
    msgpack-numpy encoded it from never existed on the wire."""
    bomb = pickle_bomb(marker)
    blob = bomb.dumps()

    def build(m: tuple[tuple[str, dict], int]) -> Sent:
        (mtype, fields), how = m
        header = {"v": protocol.VERSION, "type": mtype, **fields}
        return [
            Sent([msgpack_numpy.packb(bomb)]),
            Sent([msgpack.packb({**header, "payload": bomb}, default=msgpack_numpy.encode)],
                 {**header, "payload": msgpack_numpy.encode(bomb)}),
            Sent([packb({**header, "arrays": [["x", "|O", [1]]]}), blob]),
            Sent([packb({**header, "arrays": [["x", "|O", [1]]]}), b"\x00" * 8]),
            Sent([packb({**header, "payload": msgpack.ExtType(1, blob)})]),
            Sent([packb(header), blob]),
            Sent([pickle.dumps(bomb)]),
        ][how]
    return st.tuples(valid_message(schemas), st.integers(0, 6)).map(build)


def hostile_message(accepted: frozenset[str], schemas: dict[str, st.SearchStrategy],
                    marker: Path) -> st.SearchStrategy[Sent]:
    """One message of any hostile kind for an endpoint that accepts `accepted` types."""
    types = sorted(protocol.SCHEMAS)
    return st.one_of(
        random_frames(),
        wrong_types(types),
        encoded(schemas),
        with_valid_arrays(schemas),
        with_hostile_arrays(schemas),
        unknown_types(accepted),
        bad_versions(schemas),
        ext_types(schemas),
        deep_nesting(types),
        pickles(marker, schemas),
    )


def one_in(n: int, rare: st.SearchStrategy, common: st.SearchStrategy) -> st.SearchStrategy:
    """`rare` about once in n draws (hypothesis's one_of has no weights)."""
    return st.integers(1, n).flatmap(lambda k: rare if k == 1 else common)


def client_cases(marker: Path) -> st.SearchStrategy[list[Sent]]:
    """Hostile messages, a quarter of the time after a valid hello, so they also reach a
    known client's session (requests, cancels, pings, and everything malformed)."""
    hostile = st.lists(hostile_message(CLIENT_MESSAGES, VALID_TO_CLIENTS_ENDPOINT, marker), min_size=1, max_size=4)
    hello = message("hello", {"dataset": "train"})
    return one_in(4, hostile.map(lambda case: [hello, *case]), hostile)


def worker_cases(marker: Path) -> st.SearchStrategy[list[Sent]]:
    """Hostile messages, a fifth of the time from a fake worker that registers first, so that
    `done` and `failed` with bogus task ids and arrays, heartbeats and garbage reach a
    registered worker's session; it then goes silent and must be retired. (Each such case
    costs a retirement, about a second, hence one in five.)"""
    hostile = hostile_message(WORKER_MESSAGES, VALID_TO_WORKERS_ENDPOINT, marker)
    results = {k: VALID_TO_WORKERS_ENDPOINT[k] for k in ("done", "failed", "heartbeat")}
    session = st.tuples(
        encoded({"ready": VALID_TO_WORKERS_ENDPOINT["ready"]}),
        st.lists(encoded(results) | with_valid_arrays({"done": results["done"]}) | hostile, min_size=1, max_size=5),
    ).map(lambda m: [m[0], *m[1]])
    return one_in(5, session, st.lists(hostile, min_size=1, max_size=4))


def oversized(limit: int) -> st.SearchStrategy[Frames]:
    """A message with one frame over `limit` (at any position), among small ones."""
    def build(m: tuple[list[bytes], int, int, int]) -> Frames:
        small, at, extra, fill = m
        frames = list(small)
        frames.insert(min(at, len(frames)), bytes([fill]) * (limit + extra))
        return frames
    return st.tuples(st.lists(st.binary(max_size=30), max_size=3), st.integers(0, 3),
                     st.integers(1, 64 * 1024), st.integers(0, 255)).map(build)


# ---------------------------------------------------------------------------------------------
# The server's client endpoint


@pytest.mark.slow
@fuzz(200)
@given(data=st.data())
def test_client_endpoint_survives_hostile_messages(live, data):
    send_case_to_clients_endpoint(live, data.draw(client_cases(live.marker), label="case"))
    assert_still_serving(live)


@pytest.mark.slow
@fuzz(8)
@given(data=st.data())
def test_client_endpoint_drops_only_a_connection_that_sends_an_oversized_frame(live, data):
    send_oversized(live.server.endpoint, live.server, data.draw(oversized(CLIENT_MAXMSGSIZE), label="frames"))
    assert_still_serving(live)


# ---------------------------------------------------------------------------------------------
# The server's worker endpoint (remote workers join there over tcp)


@pytest.mark.slow
@fuzz(80)
@given(data=st.data())
def test_worker_endpoint_survives_hostile_messages_and_retires_fake_workers(live, data):
    send_case_to_workers_endpoint(live, data.draw(worker_cases(live.marker), label="case"))
    assert_still_serving(live)


@pytest.mark.slow
@fuzz(8)
@given(data=st.data())
def test_worker_endpoint_drops_only_a_connection_that_sends_an_oversized_frame(live, data):
    send_oversized(live.server.worker_endpoint, live.server, data.draw(oversized(WORKER_MAXMSGSIZE), label="frames"))
    assert_still_serving(live)


def test_stats_stay_readable_with_workers_on_long_host_names(live):
    """Found by the worker endpoint fuzz: a few workers whose host names are as long as the
    protocol allows (16 KiB) made the stats reply outgrow the 64 KiB header limit, and
    `request_stats` (so `npyloader stats`) failed. A few hundred clients do the same."""
    host = "h" * 16 * 1024
    with ExitStack() as stack:
        socks = [stack.enter_context(dealer(live.server.worker_endpoint)) for _ in range(5)]
        for sock in socks:
            send_as_worker(sock, live, [message("ready", {"pid": 7, "host": host})])
        for sock in socks:  # not silent: none of them is retired before the stats are read
            sock.send_multipart(protocol.encode("heartbeat"))
        stats = request_stats(live.server.endpoint)
    assert [w["host"] for w in stats["workers"]["list"] if not w["local"]] == [host] * len(socks)
    assert_still_serving(live)


# ---------------------------------------------------------------------------------------------
# A remote peer posing as a local worker (found by reading the worker endpoint's handling while
# writing the strategies above). Remote workers now have a socket of their own, and which socket a
# worker came on decides whether it is local.


@pytest.mark.slow
def test_a_remote_peer_posing_as_a_local_worker_neither_corrupts_batches_nor_kills_workers(start_server, id_dataset):
    """A `ready` with `local: True, worker: 0` over tcp must be served as a remote worker. Taken
    at its word, it was given shared-memory slots, so its `done` made clients receive slots nobody
    wrote (or, with `rows` over the batch size, the next slot's bytes), and its silence made the
    broker SIGKILL the real local worker 0. Served as a remote worker, its `done` without arrays
    fails exactly the batches it was given, naming the mismatch; every other batch comes from the
    real worker with the right content, and the real worker lives."""
    folder, n = id_dataset
    assert n == NUM_SAMPLES
    server = start_server("--data", str(folder), "--label-column", "-1", "--batch-size", str(BATCH),
                          "--worker-bind", "tcp://127.0.0.1:0", "--heartbeat", str(HEARTBEAT_S), workers=1)
    [real_worker] = server.workers()
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, 30, "the local worker")
    given: set[int] = set()  # batch indices the impostor was given
    failed: dict[int, str] = {}
    wrong = []
    with dealer(server.worker_endpoint) as fake, connection(server.endpoint, REPLY_TIMEOUT_S) as conn:
        fake.send_multipart(protocol.encode("ready", {"pid": 1, "host": "impostor", "local": True, "worker": 0,
                                                      "capacity": 64}))
        wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 2, 10, "the impostor to register")
        conn.request(0, list(range(NUM_BATCHES)))

        def every_batch_settled() -> bool:
            """Answer each task the impostor is given (some with too many rows) and each heartbeat,
            until the server has sent or failed every batch the client asked for."""
            while fake.poll(0):
                msg = protocol.decode(fake.recv_multipart(), allowed=TO_WORKER)
                if msg.type == "task":
                    assert msg["epoch"] == 0, msg
                    given.add(msg["index"])
                    rows = BATCH + 4 if len(given) % 2 else BATCH
                    fake.send_multipart(protocol.encode("done", {"task": msg["task"], "rows": rows, "busy_s": 0.0}))
                elif msg.type == "heartbeat":
                    fake.send_multipart(protocol.encode("heartbeat"))
            stats = request_stats(server.endpoint)
            clients = stats["clients"]
            return bool(clients) and clients[0]["batches"] + stats["failed_batches"] == NUM_BATCHES

        wait_for(every_batch_settled, 60, "every batch sent or failed", interval=0.05)
        for index in range(NUM_BATCHES):
            try:
                x, y = conn.get(0, index)
            except ServerError as e:
                failed[index] = str(e)
                continue
            try:
                assert_batch_content(x, y, index)
            except AssertionError:
                wrong.append(index)
    assert given, "the impostor was given work, so its batches were put to the test"
    assert set(failed) == given, f"failed {sorted(failed)}, but the impostor built {sorted(given)}"
    assert all("a worker sent batch" in message for message in failed.values()), failed
    # the impostor is silent now: it is retired, and nothing else may be
    wait_for(lambda: request_stats(server.endpoint)["workers"]["ready"] == 1, RETIRE_TIMEOUT_S, "the impostor's retirement")
    respawns = request_stats(server.endpoint)["workers"]["respawns"]
    assert (wrong, server.workers(), respawns) == ([], [real_worker], 0), (
        f"batches {wrong} reached the client with wrong content; the real worker {real_worker} is now "
        f"{server.workers()}, after {respawns} respawn(s)")


# ---------------------------------------------------------------------------------------------
# The client, fed hostile replies by a fake server

CLIENT_TIMEOUT_S = 5.0
SILENT_TIMEOUT_S = 0.5
FUZZ_KEY = (0, 0)
SPECS = (("x", "<f4", (FEATURES,)), ("y", "<f4", ()))
WELCOME = {"dataset": "train", "num_samples": NUM_SAMPLES, "batch_size": BATCH, "batches": NUM_BATCHES,
           "specs": [[n, d, list(s)] for n, d, s in SPECS]}
GOOD_INFO = DatasetInfo("train", NUM_SAMPLES, BATCH, NUM_BATCHES, SPECS)
# Hostile batches and errors name these keys. Batch 1 of epoch 0 is never among them: the test
# reads it after FUZZ_KEY to prove the I/O thread still works.
HOSTILE_EPOCHS = st.sampled_from([0, 1, 7, (1 << 62) - 1])
HOSTILE_INDICES = st.sampled_from([0, 2, 3, NUM_BATCHES - 1, NUM_BATCHES, (1 << 62) - 1])


def good_batch(epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """What the fake server serves for (epoch, index): distinct per key, so a mix-up shows."""
    y = (np.arange(BATCH) + BATCH * index + 1000.0 * (epoch % 1000)).astype("<f4")
    return (y[:, None] * 3 + np.arange(FEATURES)).astype("<f4"), y


class FakeServer:
    """A ROUTER on loopback, run in a thread, that plays the server for one Connection: it welcomes
    every hello, answers pings and serves each requested batch with `good_batch`; but it answers
    the first hello with `before_welcome` first, and the first request of FUZZ_KEY with `hostile`
    first, and serves FUZZ_KEY only if `serve_fuzz_key`. What the client sends must follow the
    contract too: anything else ends up in `errors`."""

    def __init__(self, hostile: Sequence[Frames] = (), before_welcome: Sequence[Frames] = (), welcome: bool = True,
                 serve_fuzz_key: bool = True) -> None:
        self.hostile, self.before_welcome = list(hostile), list(before_welcome)
        self.welcome, self.serve_fuzz_key = welcome, serve_fuzz_key
        self.errors: list[BaseException] = []
        self.url = ""
        self._bound = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-server", daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        assert self._bound.wait(REPLY_TIMEOUT_S), "the fake server did not bind"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REPLY_TIMEOUT_S)
        assert not self._thread.is_alive(), "the fake server did not stop"

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)  # created in the thread that uses it
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.url = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
            self._bound.set()
            hellos = 0
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                identity, *frames = sock.recv_multipart()
                msg = protocol.decode(frames, allowed=CLIENT_MESSAGES)

                def send(reply: list) -> None:
                    sock.send_multipart([identity, *reply])

                if msg.type == "hello":
                    if hellos == 0:
                        for reply in self.before_welcome:
                            send(reply)
                    hellos += 1
                    if self.welcome:
                        send(protocol.encode("welcome", WELCOME))
                elif msg.type == "request":
                    for index in msg["batches"]:
                        key = (msg["epoch"], index)
                        if key == FUZZ_KEY and self.hostile:
                            for reply in self.hostile:
                                send(reply)
                            self.hostile = []
                        if key != FUZZ_KEY or self.serve_fuzz_key:
                            x, y = good_batch(*key)
                            send(protocol.encode("batch", {"epoch": key[0], "index": index}, [("x", x), ("y", y)]))
                elif msg.type == "ping":
                    send(protocol.encode("pong"))
        except BaseException as e:  # reported by the test, which runs in another thread
            self.errors.append(e)
        finally:
            sock.close(0)


def conforms(arrays: dict[str, np.ndarray]) -> bool:
    """Whether a batch's arrays are what the welcome promised: its names, dtypes and sample
    shapes, in order, with the same number of rows, at most a batch."""
    got = [(n, a.dtype.str, a.shape[1:]) for n, a in arrays.items() if a.ndim]
    rows = {a.shape[0] for a in arrays.values() if a.ndim}
    return got == list(SPECS) and len(arrays) == len(SPECS) and len(rows) == 1 and rows.pop() <= BATCH


def info_of(msg: protocol.Message) -> DatasetInfo:
    return DatasetInfo(msg["dataset"], msg["num_samples"], msg["batch_size"], msg["batches"],
                       tuple((n, d, tuple(s)) for n, d, s in msg["specs"]))


def readable(frames: Frames) -> protocol.Message | None:
    try:
        return protocol.decode(frames, allowed=frozenset({"welcome", "batch", "error", "pong"}))
    except protocol.ProtocolError:
        return None


def session_error(msg: protocol.Message, welcomed: bool) -> type[Exception] | None:
    """The exception an error reply ends the session with, or None if it is about one batch, asks
    the client to say hello again, or concerns shared memory (refused: the socket serves on). A `bad_message` before the welcome means the client's own
    hello was refused."""
    code = msg["code"]
    if code in ("unknown_client", "shm_refused", "bad_release"):  # a client on the socket reads on
        return None
    if code == "unknown_dataset" or (code == "bad_message" and not welcomed):
        return ValueError
    return None if "epoch" in msg.fields and "index" in msg.fields else ServerError


@dataclass
class Verdict:
    """What the client must make of hostile replies, read in order: `first` is the first of them
    that settles the wait (the welcome, or FUZZ_KEY), with what it carries, and `ends` says
    whether any of them ends the session. A reply that settles nothing (garbage, pongs, batches
    and errors about keys not asked for) changes nothing."""

    first: str  # "good": none settles it; "batch", "failed", "fatal"; "connected" (handshake)
    carried: Any = None  # the batch's arrays, the exception type, or the welcome's info
    ends: bool = False


def verdict_after_welcome(hostile: list[Frames]) -> Verdict:
    """A Connection waiting for FUZZ_KEY, before the good batch comes: a batch of FUZZ_KEY that
    keeps the welcome's promise is the batch; one that breaks it, or an error about FUZZ_KEY,
    fails it; an error about the session or a welcome for another dataset ends the session."""
    verdict = Verdict("good")
    for msg in filter(None, map(readable, hostile)):
        key = (msg.get("epoch"), msg.get("index"))
        event: tuple[str, Any] | None = None
        if msg.type == "batch" and key == FUZZ_KEY:
            event = ("batch", tuple(msg.arrays.values())) if conforms(msg.arrays) else ("failed", None)
        elif msg.type == "error":
            fatal = session_error(msg, welcomed=True)
            if fatal is not None:
                event = ("fatal", fatal)
            elif msg["code"] != "unknown_client" and key == FUZZ_KEY:
                event = ("failed", None)
        elif msg.type == "welcome" and info_of(msg) != GOOD_INFO:
            event = ("fatal", ServerError)
        if event is not None:
            verdict.ends |= event[0] == "fatal"
            if verdict.first == "good":
                verdict.first, verdict.carried = event
    return verdict


def verdict_of_handshake(hostile: list[Frames]) -> Verdict:
    """Connection() given `hostile` before the good welcome: the first welcome among them
    connects it (the good one if none), and the session ends on an error about it or on a
    welcome unlike the first."""
    verdict, info = Verdict("good", GOOD_INFO), None
    for msg in filter(None, map(readable, hostile)):
        if msg.type == "welcome":
            if info is None:
                info = info_of(msg)
                if verdict.first == "good":
                    verdict.first, verdict.carried = "connected", info
            verdict.ends |= info_of(msg) != info
        elif msg.type == "error":
            fatal = session_error(msg, welcomed=info is not None)
            if fatal is not None:
                verdict.ends = True
                if verdict.first == "good":
                    verdict.first, verdict.carried = "fatal", fatal
    verdict.ends |= info is not None and info != GOOD_INFO
    return verdict


@contextmanager
def connection(url: str, timeout: float) -> Iterator[Connection]:
    conn = Connection(url, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()


def assert_good(batch: tuple[np.ndarray, ...], key: tuple[int, int]) -> None:
    assert len(batch) == 2
    for got, want in zip(batch, good_batch(*key)):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


@pytest.mark.parametrize("arrays", [
    [],
    [("x", np.zeros((BATCH, FEATURES), "<f4"))],
    [("x", np.zeros((BATCH, FEATURES), "<f8")), ("y", np.zeros(BATCH, "<f4"))],
    [("x", np.zeros((BATCH, 3), "<f4")), ("y", np.zeros(BATCH, "<f4"))],
    [("x", np.zeros((BATCH + 1, FEATURES), "<f4")), ("y", np.zeros(BATCH + 1, "<f4"))],
    [("x", np.zeros((BATCH, FEATURES), "<f4")), ("y", np.zeros(BATCH - 1, "<f4"))],
    [("y", np.zeros(BATCH, "<f4")), ("x", np.zeros((BATCH, FEATURES), "<f4"))],
], ids=["no-arrays", "no-y", "dtype", "sample-shape", "rows-over-batch", "rows-differ", "order"])
def test_a_batch_unlike_the_welcome_fails_clearly_instead_of_reaching_the_caller(arrays):
    """Found by the client fuzz: a batch whose arrays break what the welcome promised (here, sent
    for the key asked for, before the right one) was handed to the caller as that batch, so a
    Keras step got no `y`, another dtype or an oversized batch. It is a failed batch now."""
    bad = wire(protocol.encode("batch", {"epoch": FUZZ_KEY[0], "index": FUZZ_KEY[1]}, arrays))
    with FakeServer([bad]) as fake, connection(fake.url, CLIENT_TIMEOUT_S) as conn:
        with pytest.raises(ServerError, match="welcome promised") as raised:
            conn.get(*FUZZ_KEY)
        assert fake.url in str(raised.value) and "could not build batch 0 of epoch 0" in str(raised.value)
        assert_good(conn.get(0, 1), (0, 1))
        assert conn.batches == 1
    assert not fake.errors, fake.errors


def test_an_error_about_a_batch_never_asked_for_does_not_fail_it_later():
    """Found by the client fuzz: an error naming a batch the client had not asked for (a stray,
    or one it cancelled) was kept, and failed that batch at once when it was asked for later."""
    stray = wire(protocol.encode("error", {"code": "batch_failed", "message": "stale", "epoch": 0, "index": 2}))
    with FakeServer([stray]) as fake, connection(fake.url, CLIENT_TIMEOUT_S) as conn:
        assert_good(conn.get(*FUZZ_KEY), FUZZ_KEY)
        assert_good(conn.get(0, 2), (0, 2))
    assert not fake.errors, fake.errors


welcomes = st.just(WELCOME) | st.fixed_dictionaries({
    "dataset": names, "num_samples": nonneg, "batch_size": nonneg, "batches": nonneg,
    "specs": st.lists(st.tuples(st.sampled_from(["x", "y", "z"]), st.sampled_from(["<f4", "<f8", "|u1"]),
                                st.lists(st.integers(0, 20), max_size=2)).map(list), max_size=3)})
VALID_FROM_SERVER = {
    "welcome": welcomes,
    "batch": st.fixed_dictionaries({"epoch": HOSTILE_EPOCHS, "index": HOSTILE_INDICES}),
    "error": st.fixed_dictionaries({"code": st.sampled_from(sorted(ERROR_CODES)) | names, "message": texts},
                                   optional={"epoch": HOSTILE_EPOCHS, "index": HOSTILE_INDICES}),
    "pong": st.just({}),
    "stats_reply": st.fixed_dictionaries({"stats": st.dictionaries(st.text(max_size=6), values, max_size=3)}),
}


@st.composite
def hostile_batches(draw: st.DrawFn) -> Frames:
    """Batch messages: for keys never asked for, or for FUZZ_KEY with arrays that break the
    welcome's promise (dtype, names, sample shape, too many rows, a missing array), or whose
    frames are longer or shorter than their declared shapes."""
    epoch, index = draw(HOSTILE_EPOCHS), draw(HOSTILE_INDICES)
    rows = draw(st.integers(0, BATCH + 3))
    x, y = (np.full((rows, FEATURES), 13.0, "<f4"), np.arange(rows, dtype="<f4"))
    arrays = draw(st.sampled_from([
        [("x", x), ("y", y)],  # right shapes: for a key never asked, it must be ignored
        [("x", x.astype("<f8")), ("y", y)],
        [("y", y), ("x", x)],
        [("x", x[:, :3]), ("y", y)],
        [("x", x)],
        [("x", x), ("y", y), ("z", y)],
        [("x", x), ("y", y[:max(rows - 1, 0)])],
        [("x", x[0] if rows else x), ("y", y)],
    ]))
    frames = wire(protocol.encode("batch", {"epoch": epoch, "index": index}, arrays))
    if len(frames) > 1 and draw(st.booleans()):  # a frame whose length disagrees with its shape
        at = draw(st.integers(1, len(frames) - 1))
        cut = draw(st.integers(-4, 4).filter(bool))
        frames[at] = frames[at][:cut] if cut < 0 else frames[at] + bytes(cut)
    return frames


# Errors about batches, most of them never asked for: the client must not keep those.
hostile_errors = st.fixed_dictionaries({
    "code": st.sampled_from(["batch_failed", "out_of_range", "credit_exceeded"]), "message": texts,
    "epoch": HOSTILE_EPOCHS, "index": HOSTILE_INDICES}).map(lambda f: wire(protocol.encode("error", f)))


def hostile_replies(marker: Path) -> st.SearchStrategy[list[Frames]]:
    types = sorted(protocol.SCHEMAS)
    generated = st.one_of(
        random_frames(),
        wrong_types(types),
        encoded(VALID_FROM_SERVER),
        with_hostile_arrays(VALID_FROM_SERVER),
        unknown_types(TO_CLIENT),
        bad_versions(VALID_FROM_SERVER),
        ext_types(VALID_FROM_SERVER),
        deep_nesting(types),
        pickles(marker, {**VALID_FROM_SERVER, "batch": st.just({"epoch": FUZZ_KEY[0], "index": FUZZ_KEY[1]})}),
    ).map(lambda sent: sent.frames)
    return st.lists(generated | hostile_batches() | hostile_errors, min_size=1, max_size=6)


@pytest.fixture(scope="module")
def client_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-client") / "pwned"


def assert_clean_end(error: BaseException, url: str, verdict: Verdict) -> None:
    """A wait that ended in an exception: one the verdict allows, naming the server. When the
    session ends, the client may tell that before or after what settled the wait (it wakes the
    caller once the reply is read, and more replies may be read before the caller runs)."""
    assert url in str(error), f"{type(error).__name__} does not name {url}: {error}"
    if verdict.first == "failed":
        assert isinstance(error, ServerError) and "could not build batch" in str(error), error
    elif verdict.first == "fatal" or verdict.ends:
        assert isinstance(error, (ServerError, ValueError)), error
    else:
        raise AssertionError(f"expected {verdict}, got {error!r}")


@pytest.mark.slow
@fuzz(300)
@given(data=st.data())
def test_client_ends_every_wait_cleanly_whatever_the_server_replies(client_marker, data):
    hostile = data.draw(hostile_replies(client_marker), label="hostile")
    verdict = verdict_after_welcome(hostile)
    with FakeServer(hostile) as fake, connection(fake.url, CLIENT_TIMEOUT_S) as conn:
        try:
            got = conn.get(*FUZZ_KEY)
        except (ServerError, ValueError) as e:
            assert_clean_end(e, fake.url, verdict)
        else:
            if verdict.first == "batch":
                for a, b in zip(got, verdict.carried, strict=True):
                    np.testing.assert_array_equal(a, b)
            elif verdict.first == "fatal":  # a batch read before the caller woke
                assert conforms(dict(zip(("x", "y"), got))), got
            else:
                assert verdict.first == "good", f"expected {verdict}, got a batch"
                assert_good(got, FUZZ_KEY)
        # the I/O thread is still there: the next batches arrive, or the session's end is told
        # again; batch 2 also proves that an error about a batch never asked for was not kept
        for key in ((0, 1), (0, 2)):
            if verdict.ends:
                with pytest.raises((ServerError, ValueError)) as raised:
                    conn.get(*key)
                assert fake.url in str(raised.value), raised.value
            else:
                assert_good(conn.get(*key), key)
    assert not fake.errors, fake.errors
    assert not client_marker.exists(), "the client unpickled a payload"


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_client_handshake_ends_cleanly_whatever_comes_before_the_welcome(client_marker, data):
    hostile = data.draw(hostile_replies(client_marker), label="hostile")
    verdict = verdict_of_handshake(hostile)
    with FakeServer(before_welcome=hostile) as fake:
        try:
            with connection(fake.url, CLIENT_TIMEOUT_S) as conn:
                assert verdict.first in ("good", "connected"), f"expected {verdict}, connected"
                assert conn.info == verdict.carried, (verdict, conn.info)
                if not verdict.ends:  # and errors about batches never asked for were not kept
                    assert_good(conn.get(0, 2), (0, 2))
        except (ServerError, ValueError) as e:
            assert_clean_end(e, fake.url, verdict)
    assert not fake.errors, fake.errors
    assert not client_marker.exists(), "the client unpickled a payload"


@pytest.mark.slow
@fuzz(16)
@given(data=st.data(), during=st.sampled_from(["handshake", "batch"]))
def test_client_times_out_naming_a_server_that_only_sends_garbage(client_marker, data, during):
    """A server that never sends the welcome (or the batch): unless the garbage settles the wait,
    it ends in a TimeoutError naming the server, soon after the timeout."""
    hostile = data.draw(hostile_replies(client_marker), label="hostile")
    handshake = during == "handshake"
    verdict = verdict_of_handshake(hostile) if handshake else verdict_after_welcome(hostile)
    started = time.monotonic()
    with FakeServer(hostile=[] if handshake else hostile, before_welcome=hostile if handshake else [],
                    welcome=not handshake, serve_fuzz_key=False) as fake:
        try:
            with connection(fake.url, SILENT_TIMEOUT_S) as conn:
                if not handshake:
                    conn.get(*FUZZ_KEY)
            assert verdict.first in ("connected", "batch", "fatal"), f"expected {verdict}, got no error"
        except TimeoutError as e:
            assert verdict.first == "good", f"expected {verdict}, got {e!r}"
            assert fake.url in str(e), e
            elapsed = time.monotonic() - started
            assert elapsed < SILENT_TIMEOUT_S + 3, f"the wait took {elapsed:.1f}s"
        except (ServerError, ValueError) as e:
            assert_clean_end(e, fake.url, verdict)
    assert not fake.errors, fake.errors
    assert not client_marker.exists(), "the client unpickled a payload"


# ---------------------------------------------------------------------------------------------
# Memory and liveness at the end of the module


def bulk_round(live: Live, examples: int) -> None:
    """Many hostile cases to both endpoints with no per-case check (only the probes, so each
    case is handled before the next), plus frames just under the limits to make a leak of
    received frames show in RSS."""
    near_limit = Sent([b"\x01" * (CLIENT_MAXMSGSIZE - 1)])  # over the header limit: malformed

    @fuzz(examples)
    @given(clients=client_cases(live.marker), workers=worker_cases(live.marker))
    def round_(clients: list[Sent], workers: list[Sent]) -> None:
        send_case_to_clients_endpoint(live, [*clients, near_limit])
        send_case_to_workers_endpoint(live, [*workers, near_limit])

    round_()


@pytest.mark.slow
def test_server_memory_stays_flat_and_its_worker_alive_after_all_cases(live):
    """Runs last in this module: every case above and a first bulk round are the warm-up, then
    three more bulk rounds must not grow the server's RSS past RSS_GROWTH_LIMIT_KB."""
    pid = live.server.proc.pid
    live.rss_kb["after the fuzz tests"] = rss_kb(pid)
    bulk_round(live, 100)
    assert_still_serving(live)
    live.rss_kb["warm"] = warm = rss_kb(pid)
    for _ in range(3):
        bulk_round(live, 100)
    assert_still_serving(live)
    live.rss_kb["end"] = end = rss_kb(pid)
    print(f"server RSS (kB): {live.rss_kb}; hostile messages: {live.sent}; checks: {live.checks}")
    assert end - warm <= RSS_GROWTH_LIMIT_KB, f"server RSS grew from {warm} kB to {end} kB: {live.rss_kb}"
    assert live.server.workers() == [live.worker_pid]
    stats = request_stats(live.server.endpoint)
    assert stats["workers"]["alive"] == 1 and stats["workers"]["respawns"] == 0, stats["workers"]
    assert sum(stats["rejected"].values()) > 0 and "validator_error" not in stats["rejected"], stats["rejected"]
