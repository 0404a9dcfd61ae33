"""The wire contract between clients, the server and workers: message types, schemas, framing.

A message is a ZeroMQ multipart `[header, frame_0, frame_1, ...]`. The header is a msgpack
map with the protocol version `v`, a `type` and that type's fields; each array travels as its
own raw frame, described in the header's `arrays` list as `[name, dtype, shape]` (an
`ArraySpec`), so arrays are sent with `copy=False` and read back with `np.frombuffer`, never
copied or serialised.

The vocabulary is grouped by direction (`CLIENT_TO_SERVER`, `SERVER_TO_CLIENT`,
`WORKER_TO_BROKER`, `BROKER_TO_WORKER`): each receiver decodes with its direction's set, so
a message sent the wrong way is refused by the decoder, and each receiver's handler table
covers exactly that set.

Everything received is untrusted: `decode` checks the header against the schema of its type,
allows only plain numeric and bool dtypes, checks that each frame's length matches its declared
shape, and raises `ProtocolError` otherwise. msgpack's extension types are refused and nothing
here ever calls pickle (msgpack-numpy's decoder would, which is why it is not used).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

VERSION = 1

MAX_HEADER_BYTES = 64 * 1024
MAX_SETUP_BYTES = 64 << 20
MAX_REQUEST_BYTES = 1 << 20
MAX_ARRAYS = 8
MAX_NDIM = 8
MAX_ARRAY_BYTES = 1 << 31
MAX_CREDIT = 1024
MAX_NAME = 128

ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
)


class ProtocolError(ValueError):
    """A received message does not follow the contract; the message says which rule it broke."""


class ArraySpec(NamedTuple):
    """One array as the wire describes it: its name, numpy dtype string (`'<f4'`) and shape.

    Used both for one sample (a dataset's `welcome`) and for a whole batch (a `batch` header).
    A NamedTuple, so it unpacks and compares like the `(name, dtype, shape)` tuple it names;
    on the wire it is the list `[name, dtype, [shape]]`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, arr: np.ndarray) -> ArraySpec:
        return cls(name, arr.dtype.str, tuple(arr.shape))

    @classmethod
    def from_wire(cls, item: Sequence[Any]) -> ArraySpec:
        """From a validated `[name, dtype, shape]` list (see `_spec_list`)."""
        name, dtype, shape = item
        return cls(name, dtype, tuple(shape))

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape)]

    def batched(self, rows: int) -> ArraySpec:
        """The spec of `rows` of these samples stacked: a batch of a per-sample spec."""
        return self._replace(shape=(rows, *self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxstring = _short.maxother = 60


def _brief(value: Any) -> str:
    """A received value as quoted in an error, which is sent back in an `error` message and must
    fit its 16 KiB `message`: bounded in length, and in depth too (repr of a list nested a
    thousand deep, which msgpack decodes, raises RecursionError instead of ProtocolError)."""
    return _short.repr(value)[:80]


@dataclass(frozen=True)
class Message:
    """A decoded, validated message: its header fields and its arrays (views on the frames)."""

    type: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg_int(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 1 << 62


def _name(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_NAME


def _shard(v: Any) -> bool:
    return v is None or (
        isinstance(v, list) and len(v) == 2 and all(_nonneg_int(x) for x in v) and v[0] < v[1]
    )


def _index_list(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= MAX_CREDIT and all(_nonneg_int(x) for x in v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


MAX_TEXT = 16 * 1024


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_TEXT


def clip(text: str, limit: int = MAX_TEXT, *, tail: bool = False) -> str:
    """Text made fit to send in a field: valid UTF-8 (a file name's undecodable bytes, kept by
    Python as lone surrogates, would make msgpack raise) and at most `limit` bytes of it (so at
    most `limit` characters too; counting characters would let non-ASCII text overflow the
    header limit), saying where it was cut. `tail` keeps the end instead of the start: the
    last frames and the exception line of a traceback are what matter most."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    room = limit - 40
    note = f" ... ({len(raw) - room} bytes cut) ... "
    if tail:
        return note.lstrip() + raw[-room:].decode("utf-8", "ignore")
    return raw[:room].decode("utf-8", "ignore") + note.rstrip()


def _any_map(v: Any) -> bool:
    return isinstance(v, dict)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _map_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


NONCE_BYTES = 16
_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _routing_id(v: Any) -> bool:
    return isinstance(v, bytes) and 0 < len(v) <= 255 and v[0] != 0  # libzmq reserves ids starting with 0


def _nonce(v: Any) -> bool:
    return isinstance(v, bytes) and len(v) == NONCE_BYTES


def _segment(v: Any) -> bool:
    """A shared-memory name the client opens under /dev/shm: never a path, never hidden."""
    return isinstance(v, str) and 0 < len(v) <= 255 and set(v) <= _SEGMENT_CHARS and not v.startswith(".")


def _offsets(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_ARRAYS and all(_nonneg_int(x) for x in v)


def _shm_offer(v: Any) -> bool:
    """Where a dataset's batch slots lie, for a client on the server's host (see loader_client/shm.py)."""
    keys = {"segment": _segment, "bytes": _nonneg_int, "base": _nonneg_int, "slot_bytes": _nonneg_int,
            "nslots": _nonneg_int, "offsets": _offsets}
    return isinstance(v, dict) and all(k in v and check(v[k]) for k, check in keys.items())


def _releases(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_CREDIT and all(
        isinstance(p, list) and len(p) == 2 and all(_nonneg_int(x) for x in p) for p in v)


def _spec_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_ARRAYS and all(
        isinstance(s, list) and len(s) == 3 and _name(s[0]) and isinstance(s[1], str) and s[1] in ALLOWED_DTYPES
        and isinstance(s[2], list) and len(s[2]) <= MAX_NDIM and all(_nonneg_int(d) for d in s[2])
        for s in v
    )


Check = Callable[[Any], bool]

# Required fields of each message type and what each must look like, by direction. Optional
# fields are listed with a trailing "?". Unknown fields are ignored, so a newer peer can add some.
_CLIENT_TO_SERVER: dict[str, dict[str, Check]] = {
    "hello": {"dataset": _name, "shard?": _shard},
    "request": {"epoch": _nonneg_int, "batches": _index_list, "wait_s?": _number, "release?": _releases},
    # same-host clients: prove they see the server's memory, then give back the slots they read,
    # each named [slot, generation]
    "attach": {"nonce": _nonce},
    "release": {"slots": _releases},
    "cancel": {"keep_epoch": _nonneg_int},
    "ping": {},
    "stats": {},
    "bye": {},
}
_SERVER_TO_CLIENT: dict[str, dict[str, Check]] = {
    "welcome": {
        "dataset": _name, "num_samples": _nonneg_int, "batch_size": _nonneg_int,
        "batches": _nonneg_int, "specs": _spec_list, "shm?": _shm_offer,
    },
    "batch": {"epoch": _nonneg_int, "index": _nonneg_int},
    "attached": {"max_held": _nonneg_int},
    "slot": {"epoch": _nonneg_int, "index": _nonneg_int, "slot": _nonneg_int, "gen": _nonneg_int,
             "rows": _nonneg_int},
    "pong": {},
    "stats_reply": {"stats": _any_map},
    # `traceback`: where a batch failed in a worker, passed on from its `failed` message
    "error": {"code": _name, "message": _text, "epoch?": _nonneg_int, "index?": _nonneg_int,
              "traceback?": _text},
}
# Local workers announce themselves with `ready`; a remote worker sends `join`, gets the
# datasets in `setup`, checks it sees the same files, then sends `ready` (or `refused`). Both
# sides heartbeat; `rejoin` asks an unknown worker to start over.
_WORKER_TO_BROKER: dict[str, dict[str, Check]] = {
    "join": {"pid": _nonneg_int, "host": _text},
    "ready": {"worker?": _nonneg_int, "pid": _nonneg_int, "host": _text, "capacity?": _nonneg_int,
              "local?": _bool},
    "refused": {"message": _text},
    # `of`: sent on a remote worker's heartbeat connection, the routing id of the connection its
    # batches travel on, whose heartbeats may queue behind a batch that takes long to send
    "heartbeat": {"of?": _routing_id},
    "done": {"task": _nonneg_int, "rows": _nonneg_int, "busy_s": _number, "read_s?": _number, "augment_s?": _number},
    # `traceback`: the worker's own, its last frames kept (see `clip`)
    "failed": {"task": _nonneg_int, "message": _text, "traceback?": _text},
}
_BROKER_TO_WORKER: dict[str, dict[str, Check]] = {
    "setup": {"root": _text, "datasets": _map_list, "heartbeat_s": _number},
    "task": {
        "task": _nonneg_int, "dataset": _name, "epoch": _nonneg_int, "index": _nonneg_int,
        "slot?": _nonneg_int, "shard?": _shard,
    },
    "heartbeat": {},
    "rejoin": {},
    "stop": {},
}

CLIENT_TO_SERVER = frozenset(_CLIENT_TO_SERVER)
SERVER_TO_CLIENT = frozenset(_SERVER_TO_CLIENT)
WORKER_TO_BROKER = frozenset(_WORKER_TO_BROKER)
BROKER_TO_WORKER = frozenset(_BROKER_TO_WORKER)
SCHEMAS: dict[str, dict[str, Check]] = {**_CLIENT_TO_SERVER, **_SERVER_TO_CLIENT, **_WORKER_TO_BROKER,
                                        **_BROKER_TO_WORKER}


def _check_fields(mtype: str, header: dict[str, Any]) -> None:
    for key, check in SCHEMAS[mtype].items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        if key not in header:
            if optional:
                continue
            raise ProtocolError(f"'{mtype}' message lacks field '{key}'")
        if not check(header[key]):
            raise ProtocolError(f"'{mtype}' message has an invalid '{key}': {_brief(header[key])}")


def encode(mtype: str, fields: dict[str, Any] | None = None,
           arrays: Sequence[tuple[str, np.ndarray]] = ()) -> list[Any]:
    """Build the frames of a message. Array frames are the arrays' own buffers (no copy)."""
    header: dict[str, Any] = {"v": VERSION, "type": mtype}
    if fields:
        header.update(fields)
    frames: list[Any] = []
    if arrays:
        specs = []
        for name, arr in arrays:
            arr = np.asarray(arr, order="C")
            specs.append(ArraySpec.of(name, arr).to_wire())
            frames.append(memoryview(arr).cast("B") if arr.nbytes else b"")
        header["arrays"] = specs
    return [msgpack.packb(header, use_bin_type=True), *frames]


def encode_header(mtype: str, fields: dict[str, Any], specs: Sequence[ArraySpec]) -> bytes:
    """A header for arrays whose frames the caller supplies (e.g. views on shared memory)."""
    header = {"v": VERSION, "type": mtype, **fields, "arrays": [s.to_wire() for s in specs]}
    return msgpack.packb(header, use_bin_type=True)


def _unpack_header(raw: bytes | memoryview, limit: int) -> dict[str, Any]:
    if len(raw) > limit:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds the {limit}-byte limit")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limit, max_bin_len=limit, ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    _refuse_timestamps(header)
    return header


def _refuse_timestamps(header: dict[str, Any]) -> None:
    """msgpack decodes extension -1 (timestamps) itself, without asking ext_hook."""
    stack: list[Any] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            raise ProtocolError("msgpack extension type -1 (timestamp) is not allowed")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(frames: Sequence[Any], allowed: frozenset[str] | None = None,
           max_header_bytes: int = MAX_HEADER_BYTES) -> Message:
    """Validate and decode received frames (bytes or zmq.Frame). Raises ProtocolError.

    Only a worker reading the server's `setup` (which lists every file) and `request_stats`
    (the stats list every client and worker) raise the header limit.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = _unpack_header(_buffer(frames[0]), max_header_bytes)
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {_brief(header.get('v'))} is not supported (this side speaks {VERSION})")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {_brief(mtype)}")
    if allowed is not None and mtype not in allowed:
        raise ProtocolError(f"message type '{mtype}' is not accepted here")
    _check_fields(mtype, header)
    arrays = _decode_arrays(header, frames[1:])
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "arrays")}
    return Message(mtype, fields, arrays)


def _buffer(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _decode_arrays(header: dict[str, Any], frames: Sequence[Any]) -> dict[str, np.ndarray]:
    specs = header.get("arrays", [])
    if not _spec_list(specs):
        raise ProtocolError("'arrays' must list [name, dtype, shape] with plain numeric dtypes")
    if len(specs) != len(frames):
        raise ProtocolError(f"header describes {len(specs)} arrays but {len(frames)} frames followed")
    arrays = {}
    for (name, dtype, shape), frame in zip(specs, frames):
        dt = np.dtype(dtype)
        # numpy refuses to shape even an empty array whose other dimensions overflow, so the
        # limit applies to the extent without the zero dimensions: [0, 2**61] is refused here.
        extent = dt.itemsize
        for d in shape:
            extent *= max(d, 1)
        if extent > MAX_ARRAY_BYTES:
            what = f"shape {shape}" if 0 in shape else f"{extent} bytes"
            raise ProtocolError(f"array '{name}' declares {what}, over the {MAX_ARRAY_BYTES} limit")
        nbytes = 0 if 0 in shape else extent
        buf = _buffer(frame)
        if len(buf) != nbytes:
            raise ProtocolError(f"array '{name}' declares {nbytes} bytes but its frame has {len(buf)}")
        # read-only: a received array is a view on the message, not the caller's to write into
        arrays[name] = np.frombuffer(buf.toreadonly(), dtype=dt).reshape(shape)
    return arrays
