"""Same-host delivery: read batches straight out of the server's shared-memory slots.

A client on the server's host need not receive a batch's bytes at all: a worker already wrote
them into a slot of the dataset's segment. The client maps that segment read-only (its pages
cannot be written from here, so no client can corrupt a batch that others receive), proves it
maps the very memory the server wrote by echoing the nonce from the segment's header, and is
then told only "batch (epoch, index) is in slot k, generation g".

Lifetimes decide correctness. Every batch read from a slot is a set of read-only numpy views
whose memory is owned by one small per-batch array, the lease. numpy keeps the lease alive as
long as any view of it (or anything built on one, such as a tensor that aliases it) is alive,
and a `weakref.finalize` on the lease reports the slot free only when the last of them is
gone. The report is lock-free (a deque append and one byte down a pipe), because it runs in
whichever thread drops the last reference, at any moment, even inside the garbage collector.
So the server never reuses a slot that the program may still read, whatever holds the arrays
(Keras's enqueuer threads, a tf.data pipeline, a list the user keeps).
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np

from loader_client.protocol import NONCE_BYTES, ArraySpec

SHM_DIR = "/dev/shm"
# The segment's header, which loader_server/shm/slots.py writes: magic, layout version, nonce,
# number of slots, slot size, where slot 0 starts.
MAGIC = b"npyloader-slots\0"
HEADER_VERSION = 1
HEADER = struct.Struct(f"<{len(MAGIC)}sI{NONCE_BYTES}sQQQ")


class ShmUnavailable(RuntimeError):
    """This client cannot read the server's shared memory; the message says why."""


@dataclass(frozen=True)
class Offer:
    """Where a dataset's slots lie, as the server's welcome describes them."""

    segment: str
    bytes: int
    base: int
    slot_bytes: int
    nslots: int
    offsets: tuple[int, ...]

    @classmethod
    def from_welcome(cls, fields: dict) -> Offer:
        return cls(fields["segment"], fields["bytes"], fields["base"], fields["slot_bytes"], fields["nslots"],
                   tuple(fields["offsets"]))


class Waker:
    """A pipe the I/O thread polls, written to from any thread without taking a lock.

    Its file descriptors stay open as long as anything may still write to it: every pending
    lease finalizer holds a reference, so a late release can never write into a descriptor
    number that the process has since reused for something else."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        weakref.finalize(self, _close_fds, self.rfd, self.wfd)

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"\0")
        except OSError:
            pass  # full (a wake-up is already pending) or, at interpreter exit, closed

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 4096):
                pass
        except OSError:
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class LeaseTag:
    """What a finalized lease reports: which slot of which session, and whether the program
    ever got the batch (so the client can count what the program itself still holds)."""

    __slots__ = ("session", "slot", "gen", "handed")

    def __init__(self, session: int, slot: int, gen: int) -> None:
        self.session, self.slot, self.gen, self.handed = session, slot, gen, False


class Segment:
    """One server's slot segment, mapped read-only in this process."""

    def __init__(self, offer: Offer, specs: tuple[ArraySpec, ...], batch_size: int) -> None:
        self.offer = offer
        self._check_layout(offer, specs, batch_size)
        path = os.path.join(SHM_DIR, offer.segment)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShmUnavailable(
                f"{path} is not visible here: the server runs on another host, or in a container that does not "
                "share this one's /dev/shm (compose: `ipc: \"service:loader\"`; Kubernetes: one pod, an emptyDir "
                "of medium Memory at /dev/shm)") from None
        except PermissionError:
            raise ShmUnavailable(
                f"{path} is not readable by this user (uid {os.getuid()}): the server's segments are private to "
                "the user it runs as; run the trainer as that user") from None
        except OSError as e:
            raise ShmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < offer.bytes:
                raise ShmUnavailable(f"{path} has {size} bytes but the server described {offer.bytes}: "
                                     "another segment of that name")
            self._map = mmap.mmap(fd, offer.bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as e:
            raise ShmUnavailable(f"cannot map {path}: {e.strerror or e}") from None
        finally:
            os.close(fd)
        self._buf = memoryview(self._map)
        magic, version, nonce, nslots, slot_bytes, base = HEADER.unpack_from(self._buf, 0)
        if magic != MAGIC or version != HEADER_VERSION or (nslots, slot_bytes, base) != (
                offer.nslots, offer.slot_bytes, offer.base):
            raise ShmUnavailable(f"{path} is not the segment the server described (another host's or container's)")
        self.nonce: bytes = nonce
        self._specs = specs

    @staticmethod
    def _check_layout(offer: Offer, specs: tuple[ArraySpec, ...], batch_size: int) -> None:
        """Refuse a layout that would read past a slot or the segment: touching an unmapped page
        kills the process, so nothing the server says is trusted blindly."""
        if offer.base < HEADER.size or len(offer.offsets) != len(specs):
            raise ShmUnavailable("the server described a slot layout that does not match its arrays")
        if offer.base + offer.nslots * offer.slot_bytes > offer.bytes:
            raise ShmUnavailable("the server described slots past the end of its segment")
        for offset, (name, dtype, shape) in zip(offer.offsets, specs):
            dt = np.dtype(dtype)
            if offset % dt.itemsize or offset + batch_size * dt.itemsize * int(np.prod(shape)) > offer.slot_bytes:
                raise ShmUnavailable(f"the server described array '{name}' outside its slot")

    def read(self, slot: int, rows: int, tag: LeaseTag, released: deque[LeaseTag],
             waker: Waker) -> tuple[np.ndarray, ...]:
        """Read-only views of the first `rows` rows of each array in `slot`; when the last of
        them is gone, `tag` is queued on `released` and the I/O thread is woken."""
        if not 0 <= slot < self.offer.nslots:
            raise ValueError(f"slot {slot} is out of range: the segment has {self.offer.nslots} slots")
        lease = np.frombuffer(self._buf, np.uint8, self.offer.slot_bytes, self.offer.base + slot * self.offer.slot_bytes)
        weakref.finalize(lease, _report, released, tag, waker)
        arrays = []
        for offset, (_, dtype, shape) in zip(self.offer.offsets, self._specs):
            count = rows * int(np.prod(shape, dtype=np.int64))
            arrays.append(np.frombuffer(lease, np.dtype(dtype), count, offset).reshape((rows, *shape)))
        return tuple(arrays)


def _report(released: deque[LeaseTag], tag: LeaseTag, waker: Waker) -> None:
    released.append(tag)
    waker.wake()
