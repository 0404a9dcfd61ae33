"""Index .npy/.npz datasets from their headers alone.

Startup must not grow with data size, so `build_index` only ever reads array headers (and zip
directories); whole arrays are never loaded, and nothing is ever unpickled. What the index
holds (sources, row starts, sample spec) is all a worker's `SampleReader` needs to find a row.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import logging
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from numpy.lib import format as npy_format

from loader_server.config import ConfigError, DatasetConfig
from loader_server.data import access
from loader_server.progress import Progress

log = logging.getLogger(__name__)

NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex
DEFAULT_MAX_OPEN = 128
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
# .npy 3.0 only differs in allowing utf-8 field names, i.e. structured dtypes, refused anyway.
_HEADER_LENGTH_FORMATS = {(1, 0): "<H", (2, 0): "<I"}


class DatasetError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names it and says what to do."""


@dataclass(frozen=True)
class ArraySource:
    """One on-disk array, located from its header alone."""

    path: str
    member: str | None
    offset: int
    dtype: str
    shape: tuple[int, ...]
    fortran_order: bool
    compressed: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def where(self) -> str:
        """How messages name this array: the file, plus the member for archives."""
        return self.path if self.member is None else f"{self.path} (member {self.member!r})"


class Placement(NamedTuple):
    """An ArraySource less its path: how an array lies in its file, which many files share."""

    member: str | None
    offset: int
    dtype: str
    shape: tuple[int, ...]
    fortran_order: bool
    compressed: bool


@dataclass(frozen=True)
class SourceTable(Sequence[ArraySource]):
    """The arrays of many files, kept by column: each file's path, and which of a few distinct
    placements it has; `table[i]` is the i-th file's `ArraySource`, made when asked for.

    100,000 one-sample files usually share one header, so this is 100,000 paths and small
    ints rather than 100,000 objects: it pickles to each worker, and loads from the index
    cache, in a few hundredths of a second instead of tenths, in a fraction of the memory.
    """

    paths: tuple[str, ...]
    placements: tuple[Placement, ...]
    placement_of: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ArraySource:  # type: ignore[override]  # no slices: not needed
        return ArraySource(self.paths[i], *self.placements[self.placement_of[i]])

    def __iter__(self) -> Iterator[ArraySource]:
        for path, k in zip(self.paths, self.placement_of):
            yield ArraySource(path, *self.placements[k])

    def key(self, i: int) -> tuple[str, str | None]:
        """(path, member) of the i-th file's array: what tells arrays apart, cheaper than `self[i]`."""
        return self.paths[i], self.placements[self.placement_of[i]].member

    def first_where(self, bad: Callable[[Placement], bool]) -> ArraySource | None:
        """The first file whose placement is `bad`, judging each distinct placement once."""
        wrong = {k for k, placement in enumerate(self.placements) if bad(placement)}
        if not wrong:
            return None
        return self[next(i for i, k in enumerate(self.placement_of) if k in wrong)]

    def rows(self) -> Iterator[int]:
        """Each file's row count (its first dimension)."""
        counts = [placement.shape[0] for placement in self.placements]
        return (counts[k] for k in self.placement_of)


@dataclass(frozen=True)
class FileStamps:
    """Every file an index read, in first-use order, with its size and modification time as
    they were when its header was read (taken before the read, so a later change shows).

    Sizes go into the fingerprint, because they cover bytes no header describes; the index
    cache trusts an index only while every file still has both.
    """

    paths: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    mtimes_ns: tuple[int, ...] = ()


@dataclass(frozen=True)
class SampleSpec:
    """What one sample looks like before augmentation."""

    x_dtype: str
    x_shape: tuple[int, ...]
    y_dtype: str | None
    y_shape: tuple[int, ...] | None
    spatial_targets: bool


@dataclass(frozen=True)
class DatasetIndex:
    """Everything a worker needs to find any sample; small and picklable (no array data).

    `row_starts[i]` is the global id of the first sample in `x_sources[i]`; the last entry is
    `num_samples`. `y_sources` is aligned with `x_sources` (paired, per-sample targets);
    `labels` holds one row per sample (per-sample labels). `stamps` records every file's
    size and modification time at indexing time.
    """

    name: str
    layout: str
    num_samples: int
    spec: SampleSpec
    x_sources: SourceTable
    row_starts: tuple[int, ...]
    y_sources: SourceTable | None = None
    labels: ArraySource | None = None
    label_column: int | None = None
    x_shape: tuple[int, ...] | None = None
    stamps: FileStamps = FileStamps()

    @property
    def file_sizes(self) -> list[tuple[str, int]]:
        """(path, size) of every file, in first-use order."""
        return list(zip(self.stamps.paths, self.stamps.sizes))

    def fingerprint(self) -> str:
        """Hash what defines the samples, with paths relative to the data's common folder,
        so a remote worker can prove it sees the same data under a different root."""
        relative = _relative_paths(list(self.stamps.paths))
        h = hashlib.sha256()
        h.update(repr((self.layout, self.num_samples, self.label_column, self.x_shape)).encode())
        for path, size in self.file_sizes:
            h.update(repr((relative[path], size)).encode())
        for src in self._all_sources():
            fields = (relative[src.path], src.member, src.offset, src.dtype, src.shape,
                      src.fortran_order, src.compressed)
            h.update(repr(fields).encode())
        return h.hexdigest()

    def files_of(self, sample_ids: Sequence[int]) -> list[str]:
        """The input files holding these samples, in first-use order: what an error names."""
        file_nos = np.searchsorted(np.asarray(self.row_starts), np.asarray(sample_ids), side="right") - 1
        return list(dict.fromkeys(self.x_sources[int(i)].where for i in file_nos))

    def manifest(self) -> list[tuple[str, int]]:
        """(relative path, size) of every file in index order: what a remote worker compares
        against the server's to name the first file that differs."""
        relative = _relative_paths(list(self.stamps.paths))
        return [(relative[path], size) for path, size in self.file_sizes]

    def _all_sources(self) -> Iterator[ArraySource]:
        extra = (self.labels,) if self.labels is not None else ()
        return itertools.chain(self.x_sources, self.y_sources or (), extra)


def _relative_paths(paths: list[str]) -> dict[str, str]:
    """Each path relative to the deepest folder holding them all, '/'-separated."""
    absolute = {p: os.path.abspath(p) for p in paths}
    if not absolute:
        return {}
    root = os.path.join(os.path.commonpath([os.path.dirname(a) for a in absolute.values()]), "")
    return {p: a[len(root):].replace(os.sep, "/") for p, a in absolute.items()}


# ---------------------------------------------------------------------------------------------
# Headers

_NPY_MAGIC = b"\x93NUMPY"
# One page: enough for any header numpy writes for a plain array, so one read per file.
HEAD_BYTES = 4096
# numpy's own limit on what it will parse (longer headers are refused unless pickles are
# allowed, which they never are here); it also bounds what a hostile length field can make us read.
MAX_HEADER_BYTES = 10_000
_HEADER_ERRORS = (ValueError, KeyError, EOFError, SyntaxError, TypeError, UnicodeDecodeError, struct.error)


def read_source(path: str, member: str | None = None) -> ArraySource:
    """Locate one array from its header (and, for .npz, the zip directory) without reading data."""
    if member is not None and not _is_npz(path):
        raise DatasetError(f"{path} is a .npy file, so it has no member {member!r}; "
                           "--x-key/--y-key only apply to .npz archives")
    placement, _ = _read_placement(path, member, _HeaderMemo())
    return ArraySource(path, *placement)


def _read_placement(path: str, key: str | None, headers: _HeaderMemo) -> tuple[Placement, os.stat_result]:
    """Where the array lies in `path` (member `key` of an .npz; a .npy has none), and the
    file's stat, taken before its header was read."""
    try:
        if _is_npz(path):
            return _read_npz_placement(path, key)
        return _read_npy_placement(path, headers)
    except PermissionError as e:
        raise DatasetError(f"cannot read {path}: {access.file_problem(path)}") from e
    except OSError as e:
        raise DatasetError(
            f"cannot read {path}: {e.strerror or e}; check it exists and is readable") from e


def _is_npz(path: str) -> bool:
    return path.lower().endswith(".npz")


def _read_npy_placement(path: str, headers: _HeaderMemo) -> tuple[Placement, os.stat_result]:
    """One open, fstat, read and close: the least a header costs (Python's buffered `open`
    and numpy's reader take about twice as long per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        head = os.read(fd, HEAD_BYTES)
        found = headers.match(head)
        if found is None:
            end = _header_end(head, path)
            if len(head) < end:
                head += os.pread(fd, end - len(head), len(head))
            found = headers.vet(head[:end], path)
    finally:
        os.close(fd)
    placement, nbytes = found
    _check_length(nbytes, placement, st.st_size, placement.offset, path)
    return placement, st


class _HeaderMemo:
    """Headers already parsed and checked, by their bytes: files with the same header hold
    the same kind of array, so 100,000 such files cost one parse."""

    def __init__(self) -> None:
        self._known: dict[bytes, tuple[Placement, int]] = {}
        self._last: bytes | None = None

    def match(self, head: bytes) -> tuple[Placement, int] | None:
        """The placement and data size of a file whose first bytes start with the last header
        seen. A header says where it ends (magic, version, length), so a file whose first
        bytes equal a whole header has exactly that header."""
        last = self._last
        return self._known[last] if last is not None and head.startswith(last) else None

    def vet(self, header: bytes, where: str) -> tuple[Placement, int]:
        found = self._known.get(header)
        if found is None:
            found = self._known[header] = _vet_header(header, where)
        self._last = header
        return found


def _header_end(head: bytes, where: str) -> int:
    """Where a .npy file's data starts, from its first bytes (magic, version, header length)."""
    try:
        if head[:len(_NPY_MAGIC)] != _NPY_MAGIC:
            raise ValueError("no .npy magic")
        length_format = _HEADER_LENGTH_FORMATS[(head[6], head[7])]
        (length,) = struct.unpack_from(length_format, head, 8)
    except (*_HEADER_ERRORS, IndexError) as e:
        raise DatasetError(_bad_header(where)) from e
    if length > MAX_HEADER_BYTES:
        raise DatasetError(_bad_header(where))
    return 8 + struct.calcsize(length_format) + length


def _read_header(f: BinaryIO, where: str) -> bytes:
    """A .npy header (magic to the start of the data) from a stream, e.g. an .npz member."""
    head = f.read(8)
    if len(head) == 8 and head[6:8] == b"\x02\x00":
        head += f.read(4)
    else:
        head += f.read(2)
    end = _header_end(head, where)
    return head + f.read(end - len(head))


def _vet_header(header: bytes, where: str) -> tuple[Placement, int]:
    """Parse a whole .npy header with numpy's own parser (a literal_eval, never an eval or a
    pickle) and check it; every kind of damage becomes one clear message naming `where`."""
    version = (header[6], header[7])
    try:
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(io.BytesIO(header[8:]))
        else:
            shape, fortran, dtype = npy_format.read_array_header_2_0(io.BytesIO(header[8:]))
    except _HEADER_ERRORS as e:
        raise DatasetError(_bad_header(where)) from e
    if any(d < 0 for d in shape):
        raise DatasetError(_bad_header(where))
    _check_dtype(dtype, where)
    placement = Placement(None, len(header), dtype.str, shape, fortran, False)
    return placement, math.prod(shape) * dtype.itemsize


def _bad_header(where: str) -> str:
    return f"{where} is not a valid .npy file (bad magic/header): re-save it with numpy.save"


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject:
        raise DatasetError(f"{where} has dtype object; npyloader never unpickles: save numeric arrays")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise DatasetError(f"{where} has dtype {dtype}, which is not numeric or bool: "
                           "save numeric arrays (e.g. with .astype(np.float32))")


def _check_length(nbytes: int, placement: Placement, available: int, start: int, where: str) -> None:
    """A header can promise more data than was written (interrupted copy or save)."""
    missing = start + nbytes - available
    if missing > 0:
        raise DatasetError(
            f"{where} is truncated: its header promises {nbytes} data bytes "
            f"(shape {placement.shape}, dtype {placement.dtype}) but {missing} are missing; re-save or re-copy it")


def _read_npz_placement(path: str, member: str | None) -> tuple[Placement, os.stat_result]:
    st = os.stat(path)
    try:
        with zipfile.ZipFile(path) as zf:
            info = zip_member(zf, path, member)
            key = _member_key(info.filename)
            where = f"{path} (member {key!r})"
            if info.compress_type == zipfile.ZIP_STORED:
                return _stored_member_placement(zf, info, key, where), st
            with zf.open(info) as f:
                placement, nbytes = _vet_header(_read_header(f, where), where)
    except (zipfile.BadZipFile, EOFError, struct.error, NotImplementedError, zlib.error) as e:
        raise DatasetError(f"{path} is not a valid .npz archive: re-save it with numpy.savez") from e
    placement = placement._replace(member=key, compressed=True)
    _check_length(nbytes, placement, info.file_size, placement.offset, where)
    return placement, st


def _member_key(name: str) -> str:
    """Members are named the way numpy.load names them: 'x.npy' is 'x'."""
    return name[:-4] if name.endswith(".npy") else name


def zip_member(zf: zipfile.ZipFile, path: str, member: str | None) -> zipfile.ZipInfo:
    infos = {_member_key(i.filename): i for i in zf.infolist() if not i.is_dir()}
    if member is None:
        if len(infos) == 1:
            return next(iter(infos.values()))
        raise DatasetError(f"{path} has members {', '.join(sorted(infos)) or '(none)'}; "
                           "pass --x-key NAME to say which one holds the inputs")
    info = infos.get(_member_key(member))
    if info is None:
        raise DatasetError(f"{path} has no member {member!r}; its members are "
                           f"{', '.join(sorted(infos)) or '(none)'}")
    return info


def _stored_member_placement(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, where: str) -> Placement:
    """An uncompressed member is a plain .npy file inside the zip: find where its bytes start.

    The local header is read rather than trusted from the central directory, because its
    extra field (zip64 sizes, for one) can differ in length.
    """
    fp = zf.fp
    assert fp is not None
    fp.seek(info.header_offset)
    magic, *_, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(fp.read(_ZIP_LOCAL_HEADER.size))
    if magic != _ZIP_LOCAL_MAGIC:
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    member_start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    fp.seek(member_start)
    placement, nbytes = _vet_header(_read_header(fp, where), where)
    offset = member_start + placement.offset
    placement = placement._replace(member=key, offset=offset)
    _check_length(nbytes, placement, info.file_size, offset - member_start, where)
    fp.seek(0, os.SEEK_END)
    _check_length(nbytes, placement, fp.tell(), offset, where)
    return placement


# ---------------------------------------------------------------------------------------------
# Files


def expand_files(pattern: str, option: str = "--data") -> list[str]:
    """A folder means its .npy/.npz files; anything else is a glob (`**` recurses). A folder
    on the way that this user may not enter or list is named as the reason for finding nothing."""
    if os.path.isdir(pattern):
        try:
            with os.scandir(pattern) as entries:
                found = sorted(e.path for e in entries
                               if e.name.endswith((".npy", ".npz")) and e.is_file())
        except PermissionError as e:
            raise DatasetError(f"{option} folder {pattern!r}: {access.folder_problem(pattern) or e}") from e
        if not found:
            raise DatasetError(
                f"{option} folder {pattern!r} has no .npy or .npz files directly inside")
        return found
    found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not found and (blocked := access.folder_problem(pattern)):
        raise DatasetError(f"{option} {pattern!r} matches no files: {blocked}")
    if not found:
        raise DatasetError(f"{option} {pattern!r} matches no files: check the path, and quote the "
                           "glob in the shell (e.g. 'data/*.npy') so npyloader expands it")
    return found


def _data_files(patterns: tuple[str, ...]) -> list[str]:
    """Every pattern's files, each once however many patterns or spellings name it."""
    if len(patterns) == 1 and os.path.isdir(patterns[0]):
        return expand_files(patterns[0])  # one folder's listing names each file once
    seen: set[str] = set()
    files = []
    for pattern in patterns:
        for path in expand_files(pattern):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _sources(paths: list[str], key: str | None, stamps: Stamps) -> SourceTable:
    """Read every file's header into a table, noting each file's size and mtime in `stamps`."""
    placements: dict[Placement, int] = {}
    placement_of = []
    headers = _HeaderMemo()
    with Progress("indexing: reading .npy headers", len(paths), "files") as progress:
        for p in paths:
            placement, st = _read_placement(p, key, headers)
            placement_of.append(placements.setdefault(placement, len(placements)))
            stamps.setdefault(p, (st.st_size, st.st_mtime_ns))
            progress.advance()
    return SourceTable(tuple(paths), tuple(placements), tuple(placement_of))


def _pair_files(inputs: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """Match by stem when both sides have the same unique stems; else by sorted order."""
    in_stems = [Path(p).stem for p in inputs]
    tg_stems = {Path(p).stem: p for p in targets}
    unique = len(set(in_stems)) == len(inputs) and len(tg_stems) == len(targets)
    if unique and set(in_stems) == set(tg_stems):
        return [(p, tg_stems[s]) for p, s in zip(inputs, in_stems)]
    if len(inputs) != len(targets):
        raise DatasetError(f"{len(inputs)} input files but {len(targets)} --targets files, and their "
                           "names do not match one to one: give one target file per input file")
    return list(zip(inputs, targets))


def _check_consistent(sources: SourceTable, per_sample_shape: bool, role: str) -> None:
    """Every file must look like the first, so one SampleSpec describes every sample."""
    first = sources[0]

    def sample_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if per_sample_shape else shape[1:]

    src = sources.first_where(lambda p: p.dtype != first.dtype or sample_shape(p.shape) != sample_shape(first.shape))
    if src is None:
        return
    if src.dtype != first.dtype:
        raise DatasetError(
            f"{src.where} has dtype {np.dtype(src.dtype)} but {first.where} has "
            f"{np.dtype(first.dtype)}: all {role} files must share one dtype; convert with astype")
    raise DatasetError(f"{src.where} has samples of shape {sample_shape(src.shape)} but {first.where} has "
                       f"{sample_shape(first.shape)}: all {role} files must share one sample shape")


def _require_rows(sources: SourceTable) -> None:
    src = sources.first_where(lambda p: not p.shape)
    if src is not None:
        raise DatasetError(f"{src.where} holds a single 0-d value, not rows of samples: "
                           "use --layout per-sample, or save an array of shape (rows, ...)")


def _row_starts(sources: SourceTable) -> tuple[int, ...]:
    return tuple(itertools.accumulate(sources.rows(), initial=0))


# ---------------------------------------------------------------------------------------------
# Layouts

Stamps = dict[str, tuple[int, int]]  # path: (size, mtime in ns), in first-use order


@dataclass
class _Layout:
    """What a layout builder found, before x_shape and the spec are derived."""

    x_sources: SourceTable
    x_sample_shape: tuple[int, ...]
    row_starts: tuple[int, ...]
    y_sources: SourceTable | None = None
    labels: ArraySource | None = None
    label_column: int | None = None
    y_dtype: str | None = None
    y_shape: tuple[int, ...] | None = None
    image_targets: bool = False  # y is a whole array per sample (paired, per-sample targets)


def build_index(cfg: DatasetConfig) -> DatasetIndex:
    """Index a dataset from headers alone, refusing at startup anything a worker would trip on."""
    _check_options(cfg)
    files = _data_files(cfg.data)
    builders = {"combined": _combined, "paired": _paired, "per-sample": _per_sample}
    stamps: Stamps = {}
    found = builders[cfg.layout](cfg, files, stamps)
    num_samples = found.row_starts[-1]
    if num_samples == 0:
        raise DatasetError(f"dataset '{cfg.name}': its {len(files)} files hold no samples (0 rows)")
    x_shape = _final_x_shape(cfg.x_shape, found.x_sample_shape, found.x_sources[0].where)
    spatial = found.image_targets and _same_plane(x_shape, found.y_shape)
    spec = SampleSpec(found.x_sources[0].dtype, x_shape, found.y_dtype, found.y_shape, spatial)
    sizes, mtimes = zip(*stamps.values())
    index = DatasetIndex(
        name=cfg.name, layout=cfg.layout, num_samples=num_samples, spec=spec,
        x_sources=found.x_sources, row_starts=found.row_starts, y_sources=found.y_sources,
        labels=found.labels, label_column=found.label_column, x_shape=cfg.x_shape,
        stamps=FileStamps(tuple(stamps), sizes, mtimes),
    )
    log.info("dataset '%s': %d samples from %d files (%s), x %s %s", cfg.name, num_samples,
             len(files), cfg.layout, spec.x_dtype, spec.x_shape)
    return index


def _check_options(cfg: DatasetConfig) -> None:
    where = f"dataset '{cfg.name}'"
    if cfg.layout == "combined" and cfg.targets is not None:
        raise ConfigError(f"{where}: --targets only applies to --layout paired or per-sample")
    if cfg.layout == "combined" and cfg.y_key is not None:
        raise ConfigError(f"{where}: --y-key only applies to --layout paired or per-sample; "
                          "for combined files use --label-column")


def _same_plane(x_shape: tuple[int, ...], y_shape: tuple[int, ...] | None) -> bool:
    """Geometric augmentation can move y with x only if y spans the same (H, W) as x."""
    return y_shape is not None and len(x_shape) >= 2 and y_shape[:2] == x_shape[:2]


def _final_x_shape(x_shape: tuple[int, ...] | None, natural: tuple[int, ...],
                   where: str) -> tuple[int, ...]:
    if x_shape is None:
        return natural
    if math.prod(x_shape) != math.prod(natural):
        raise DatasetError(
            f"{where}: --x-shape {x_shape} has {math.prod(x_shape)} elements but its samples have "
            f"{math.prod(natural)} (shape {natural}): pick a shape with the same number of elements")
    return tuple(x_shape)


def _combined(cfg: DatasetConfig, files: list[str], stamps: Stamps) -> _Layout:
    sources = _sources(files, cfg.x_key, stamps)
    _require_rows(sources)
    _check_consistent(sources, per_sample_shape=False, role="data")
    first = sources[0]
    if cfg.label_column is None:
        return _Layout(sources, first.shape[1:], _row_starts(sources))
    if len(first.shape) != 2:
        raise DatasetError(f"{first.where} has shape {first.shape}; --label-column needs 2-D files "
                           "of shape (rows, columns)")
    cols = first.shape[1]
    column = cfg.label_column + cols if cfg.label_column < 0 else cfg.label_column
    if not 0 <= column < cols:
        raise DatasetError(f"--label-column {cfg.label_column} is out of range for {first.where}, "
                           f"which has {cols} columns (valid: {-cols}..{cols - 1})")
    return _Layout(sources, (cols - 1,), _row_starts(sources), label_column=column,
                   y_dtype=first.dtype, y_shape=())


def _paired(cfg: DatasetConfig, files: list[str], stamps: Stamps) -> _Layout:
    x_sources, y_sources = _with_targets(cfg, files, stamps)
    _require_rows(x_sources)
    _require_rows(y_sources)
    _check_consistent(x_sources, per_sample_shape=False, role="input")
    _check_consistent(y_sources, per_sample_shape=False, role="target")
    for i, (x_rows, y_rows) in enumerate(zip(x_sources.rows(), y_sources.rows())):
        if x_rows != y_rows:
            raise DatasetError(f"{x_sources[i].where} has {x_rows} rows but its target {y_sources[i].where} has "
                               f"{y_rows}: paired files must have the same number of rows")
    return _Layout(x_sources, x_sources[0].shape[1:], _row_starts(x_sources), y_sources=y_sources,
                   y_dtype=y_sources[0].dtype, y_shape=y_sources[0].shape[1:], image_targets=True)


def _with_targets(cfg: DatasetConfig, files: list[str], stamps: Stamps) -> tuple[SourceTable, SourceTable]:
    """Targets come from --targets files, or from --y-key members of the inputs' own archives."""
    if cfg.targets is not None:
        pairs = _pair_files(files, expand_files(cfg.targets, "--targets"))
        inputs, targets = zip(*pairs)
        return _sources(list(inputs), cfg.x_key, stamps), _sources(list(targets), cfg.y_key, stamps)
    for path in files:
        if not _is_npz(path):
            raise DatasetError(f"{path} is a .npy file but --y-key names a member of a .npz archive: "
                               "pass --targets GLOB for separate target files")
    return _sources(files, cfg.x_key, stamps), _sources(files, cfg.y_key, stamps)


def _per_sample(cfg: DatasetConfig, files: list[str], stamps: Stamps) -> _Layout:
    starts = tuple(range(len(files) + 1))
    if cfg.targets is not None or (cfg.y_key is not None and cfg.labels is None):
        x_sources, y_sources = _with_targets(cfg, files, stamps)
        _check_consistent(x_sources, per_sample_shape=True, role="sample")
        _check_consistent(y_sources, per_sample_shape=True, role="target")
        return _Layout(x_sources, x_sources[0].shape, starts, y_sources=y_sources,
                       y_dtype=y_sources[0].dtype, y_shape=y_sources[0].shape, image_targets=True)
    x_sources = _sources(files, cfg.x_key, stamps)
    _check_consistent(x_sources, per_sample_shape=True, role="sample")
    layout = _Layout(x_sources, x_sources[0].shape, starts)
    if cfg.labels is not None:
        layout.labels = _labels_source(cfg.labels, cfg.y_key, len(files), stamps)
        layout.y_dtype, layout.y_shape = layout.labels.dtype, layout.labels.shape[1:]
    return layout


def _labels_source(path: str, key: str | None, num_files: int, stamps: Stamps) -> ArraySource:
    placement, st = _read_placement(path, key, _HeaderMemo())
    labels = ArraySource(path, *placement)
    stamps.setdefault(path, (st.st_size, st.st_mtime_ns))
    rows = labels.shape[0] if labels.shape else 0
    if rows != num_files:
        raise DatasetError(f"--labels {labels.where} has {rows} entries but there are {num_files} "
                           "sample files: give one label per file, in sorted file order")
    return labels
