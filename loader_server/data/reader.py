"""Read single samples of an indexed dataset from memory maps, inside a worker process.

Each worker maps each file once, keeps a bounded number of maps open (100k files must not
exhaust file descriptors), and copies out one row per sample, straight into the batch being
assembled. A file that shrinks after indexing is caught before its pages are touched.
"""

from __future__ import annotations

import logging
import mmap
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from numpy.lib import format as npy_format

from loader_server.data.index import (
    DEFAULT_MAX_OPEN,
    ArraySource,
    DatasetError,
    DatasetIndex,
    SourceTable,
    zip_member,
)

log = logging.getLogger(__name__)


class _Mapped:
    """One open array: a memory map we own, so we can check its file has not shrunk before
    touching it (touching pages past the end of a truncated file kills the process with SIGBUS)."""

    def __init__(self, src: ArraySource) -> None:
        self.needed = src.offset + src.nbytes
        start = src.offset - src.offset % mmap.ALLOCATIONGRANULARITY
        with open(src.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), self.needed - start, access=mmap.ACCESS_READ,
                                offset=start)
        order = "F" if src.fortran_order else "C"
        self.array: np.ndarray | None = np.ndarray(
            src.shape, np.dtype(src.dtype), buffer=self.mm, offset=src.offset - start, order=order)

    def get(self) -> np.ndarray:
        if self.mm.size() < self.needed:
            raise OSError(f"file shrank to {self.mm.size()} bytes, {self.needed} needed")
        assert self.array is not None
        return self.array

    def close(self) -> None:
        self.array = None
        try:
            self.mm.close()
        except BufferError:
            pass  # a view survives (say, in a traceback's frame); the map closes when it is freed


class _Loaded:
    """An array held in memory: a deflated .npz member cannot be mapped, so it is decompressed
    once and kept; an empty array has nothing to map."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @classmethod
    def decompress(cls, src: ArraySource) -> _Loaded:
        with zipfile.ZipFile(src.path) as zf:
            info = zip_member(zf, src.path, src.member)
            with zf.open(info) as f:
                return cls(npy_format.read_array(f, allow_pickle=False))

    def get(self) -> np.ndarray:
        return self.array

    def close(self) -> None:
        """Nothing to release early: the memory goes with this object."""


def _without_column(row: np.ndarray, column: int) -> np.ndarray:
    """The row minus its label column: a view when the label is first or last, as it usually is."""
    if column == row.shape[0] - 1:
        return row[:-1]
    if column == 0:
        return row[1:]
    return np.delete(row, column)


class SampleReader:
    """Opened once per worker process; keeps an LRU of open maps so 100k files never exhaust
    file descriptors (each map holds one)."""

    def __init__(self, index: DatasetIndex, max_open: int = DEFAULT_MAX_OPEN) -> None:
        self.index = index
        self.max_open = max(1, max_open)
        self._starts = np.asarray(index.row_starts, dtype=np.int64)
        self._open: OrderedDict[tuple[str, str | None], _Mapped | _Loaded] = OrderedDict()
        self._warned: set[str] = set()

    def locate(self, sample_id: int) -> tuple[str, int]:
        """(file path, row) of a sample, for messages like 'sample 1234 (data/3.npy row 17)'."""
        file_no, row = self._position(sample_id)
        return self.index.x_sources.paths[file_no], row

    def read(self, sample_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Copy one sample out of its file(s), so no caller can hold a map open or write into it."""
        with self._reading(sample_id) as (x, y):
            return np.array(x), None if y is None else np.array(y)

    def read_into(self, sample_id: int, outs: Sequence[np.ndarray], row: int) -> None:
        """Copy one sample straight into row `row` of a batch's arrays (x, then y if any).

        Without augmentation this is the only copy a sample's bytes see in the worker: from
        the page cache into the shared-memory slot the client is sent from.
        """
        with self._reading(sample_id) as values:
            for out, value in zip(outs, values):
                out[row] = value

    def read_batch_into(self, sample_ids: np.ndarray, outs: Sequence[np.ndarray]) -> None:
        """read_into for a whole batch, into rows 0..n-1: the same one copy per sample, with every
        sample's file and row found at once (one searchsorted) rather than one by one, which is
        most of what reading costs besides the copy itself. Errors name the sample, as read_into's."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < self.index.num_samples):
            bad = next(int(i) for i in ids if not 0 <= i < self.index.num_samples)
            self._position(bad)  # raises, naming it
        file_nos = np.searchsorted(self._starts, ids, side="right") - 1
        rows = ids - self._starts[file_nos]
        for j, (file_no, row) in enumerate(zip(file_nos.tolist(), rows.tolist())):
            try:
                for out, value in zip(outs, self._views(file_no, row)):
                    out[j] = value
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                src = self.index.x_sources[file_no]
                raise DatasetError(f"sample {int(ids[j])} ({src.where} row {row}): cannot read: {e}; "
                                   "was the file changed or removed after the server started?") from e

    @contextmanager
    def _reading(self, sample_id: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Views on the mapped file(s), valid inside the block; read errors name file and row."""
        file_no, row = self._position(sample_id)
        try:
            yield self._views(file_no, row)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            src = self.index.x_sources[file_no]
            raise DatasetError(f"sample {sample_id} ({src.where} row {row}): cannot read: {e}; "
                               "was the file changed or removed after the server started?") from e

    def close(self) -> None:
        while self._open:
            _, opened = self._open.popitem(last=False)
            opened.close()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _position(self, sample_id: int) -> tuple[int, int]:
        if not 0 <= sample_id < self.index.num_samples:
            raise IndexError(f"sample {sample_id} is out of range for dataset '{self.index.name}' "
                             f"with {self.index.num_samples} samples")
        file_no = int(np.searchsorted(self._starts, sample_id, side="right")) - 1
        return file_no, sample_id - int(self._starts[file_no])

    def _views(self, file_no: int, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        index = self.index
        per_sample = index.layout == "per-sample"
        data = self._array_in(index.x_sources, file_no)
        x = data if per_sample else data[row]
        y = None
        if index.label_column is not None:
            y = x[index.label_column]
            x = _without_column(x, index.label_column)
        elif index.y_sources is not None:
            target = self._array_in(index.y_sources, file_no)
            y = target if per_sample else target[row]
        elif index.labels is not None:
            y = self._array(index.labels)[file_no]
        return x.reshape(index.spec.x_shape), y

    def _array_in(self, table: SourceTable, i: int) -> np.ndarray:
        """The i-th file's array; its ArraySource is made only when the file must be opened,
        since making one costs about as much as the rest of reading a small sample."""
        key = table.key(i)
        opened = self._open.get(key)
        if opened is None:
            return self._opened(key, table[i])
        self._open.move_to_end(key)
        return opened.get()

    def _array(self, src: ArraySource) -> np.ndarray:
        key = (src.path, src.member)
        opened = self._open.get(key)
        if opened is None:
            return self._opened(key, src)
        self._open.move_to_end(key)
        return opened.get()

    def _opened(self, key: tuple[str, str | None], src: ArraySource) -> np.ndarray:
        opened = self._open[key] = self._load(src)
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return opened.get()

    def _load(self, src: ArraySource) -> _Mapped | _Loaded:
        if src.nbytes == 0:
            return _Loaded(np.empty(src.shape, np.dtype(src.dtype)))
        if not src.compressed:
            return _Mapped(src)
        if src.path not in self._warned:
            self._warned.add(src.path)
            log.warning("%s is a compressed .npz, so each worker decompresses it fully into "
                        "memory; save it with np.savez (not savez_compressed) to memory-map it",
                        src.path)
        return _Loaded.decompress(src)
