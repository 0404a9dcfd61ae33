"""Shared-memory batch slots: local workers assemble batches where clients can read them.

Relaying every batch worker -> broker -> client halves the transport ceiling on a small
machine (DESIGN.md). Instead the server owns one shared-memory segment per dataset, cut into
fixed-size slots; a worker gathers and augments a batch straight into the slot the broker
assigned. A client on another host gets views of that slot sent with `copy=False` (one socket
hop); a client on this host maps the segment read-only and is only told which slot to read
(`loader_client/shm.py`), so the batch's bytes are never copied after the worker wrote them.

The segment's first page is a header: a magic string, the layout version and a per-server
random nonce. A client proves it sees this very memory (not a same-named segment in another
container or host) by echoing the nonce, which never crosses the network from the server.
Every slot carries a generation, bumped each time it is handed out, so a release naming an
older use of the slot is told apart from the current one.

The server creates (mode 0600, only its user may map it) and unlinks every segment, so a
worker killed mid-batch leaks nothing: its slot is simply reassigned.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections import deque
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from loader_client.protocol import NONCE_BYTES, ArraySpec
from loader_client.shm import HEADER, HEADER_VERSION, MAGIC
from loader_server.config import ConfigError

_ALIGN = 64
HEADER_BYTES = 4096  # one page, so slots start page-aligned


@dataclass(frozen=True)
class ArrayLayout:
    """One array of a batch: its dtype, the shape of one sample, where it starts in a slot."""

    name: str
    dtype: str
    sample_shape: tuple[int, ...]
    offset: int

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SlotLayout:
    """How the slots of one dataset's segment are laid out; picklable, sent to workers."""

    shm_name: str
    nslots: int
    batch_size: int
    slot_bytes: int
    arrays: tuple[ArrayLayout, ...]
    base: int = HEADER_BYTES

    @property
    def total_bytes(self) -> int:
        return self.base + self.nslots * self.slot_bytes

    def slot_offset(self, slot: int) -> int:
        return self.base + slot * self.slot_bytes

    def views(self, buf: memoryview, slot: int, rows: int) -> list[np.ndarray]:
        """Writable arrays of shape (rows, *sample_shape) over one slot."""
        base = self.slot_offset(slot)
        out = []
        for a in self.arrays:
            start = base + a.offset
            count = rows * int(np.prod(a.sample_shape, dtype=np.int64))
            arr = np.frombuffer(buf, dtype=a.dtype, count=count, offset=start)
            out.append(arr.reshape((rows, *a.sample_shape)))
        return out

    def frames(self, buf: memoryview, slot: int, rows: int) -> list[memoryview]:
        """Read-only byte views of the filled part of a slot, one per array, for zmq."""
        base = self.slot_offset(slot)
        return [buf[base + a.offset: base + a.offset + rows * a.sample_bytes].toreadonly()
                for a in self.arrays]

    def specs(self, rows: int) -> list[ArraySpec]:
        """The arrays of a batch of `rows` in one slot, as its `batch` header describes them."""
        return [ArraySpec(a.name, a.dtype, a.sample_shape).batched(rows) for a in self.arrays]


def plan_layout(shm_name: str, nslots: int, batch_size: int, arrays: list[ArraySpec]) -> SlotLayout:
    """Place each array of a batch at an aligned offset inside a slot."""
    layouts, offset = [], 0
    for name, dtype, shape in arrays:
        layouts.append(ArrayLayout(name, np.dtype(dtype).str, tuple(shape), offset))
        offset += batch_size * layouts[-1].sample_bytes
        offset = -(-offset // _ALIGN) * _ALIGN
    return SlotLayout(shm_name, nslots, batch_size, max(offset, _ALIGN), tuple(layouts))


class SlotPool:
    """The server's side of one segment: creates it, hands out free slots, unlinks it at the end.

    `name` (e.g. npyloader-PID-DATASET) says in /dev/shm whose segment it is."""

    def __init__(self, nslots: int, batch_size: int, arrays: list[ArraySpec], name: str | None = None) -> None:
        size = plan_layout("", nslots, batch_size, arrays).total_bytes
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            _reserve(self._shm.name, size)
        except BaseException:  # whatever stopped it (Ctrl-C too), leave no segment behind; re-raised
            self._shm.close()
            self._shm.unlink()
            raise
        self.layout = plan_layout(self._shm.name, nslots, batch_size, arrays)
        self.buf = self._shm.buf
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        HEADER.pack_into(self.buf, 0, MAGIC, HEADER_VERSION, self.nonce, nslots, self.layout.slot_bytes,
                         self.layout.base)
        self.generation = [0] * nslots
        self._free: deque[int] = deque(range(nslots))

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot, its generation bumped: whatever named its previous use is now stale."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self.generation[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        """Unlink the segment. Views zmq may still hold keep the mapping alive until freed."""
        self.buf = None  # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:
            pass  # a frame still referenced by zmq; the mapping goes when the process exits
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


SHM_DIR = "/dev/shm"


def _reserve(name: str, size: int) -> None:
    """Claim the segment's memory now. tmpfs allocates a page on its first write, and a write
    that finds /dev/shm full kills the writing worker with SIGBUS, mid-epoch, again and again;
    here the shortage is one clear error at startup instead."""
    path = os.path.join(SHM_DIR, name.lstrip("/"))
    if not hasattr(os, "posix_fallocate") or not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # a file system that cannot reserve space; pages come on first write as before
        if e.errno != errno.ENOSPC:
            raise
        st = os.statvfs(SHM_DIR)
        raise ConfigError(
            f"not enough shared memory: the batch slots need {size / 2**20:.0f} MiB in {SHM_DIR}, which has "
            f"{st.f_bavail * st.f_frsize / 2**20:.0f} MiB free; give it more (docker run --shm-size, compose "
            f"shm_size, Kubernetes an emptyDir with medium: Memory at /dev/shm) or lower --batch-size") from e
    finally:
        os.close(fd)


class SlotReader:
    """A worker's side: attaches to segments by name once and keeps them mapped."""

    def __init__(self) -> None:
        self._segments: dict[str, shared_memory.SharedMemory] = {}

    def buffer(self, layout: SlotLayout) -> memoryview:
        shm = self._segments.get(layout.shm_name)
        if shm is None:
            shm = shared_memory.SharedMemory(name=layout.shm_name)
            self._segments[layout.shm_name] = shm
        return shm.buf

    def close(self) -> None:
        for shm in self._segments.values():
            try:
                shm.close()
            except BufferError:
                pass
        self._segments.clear()
