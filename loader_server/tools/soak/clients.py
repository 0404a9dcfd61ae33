"""The soak's clients, each in its own process, and the soak's reading of what they report.

A client reads epoch after epoch as a trainer would, and appends one JSON line per epoch to its
result file: every sample id it received, how long each batch kept it waiting, and how many rows
it checked pixel by pixel. The soak reads those files while the clients run and again at the
end, and decides what was lost or repeated itself: a client only reports what it saw. Files,
not sockets, carry the results, and nothing is ever pickled.

    python -m loader_server.tools.soak.clients SPEC_JSON
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loader_client.stream import BatchStream, Connection
from loader_server.data.augment import build_pipeline, sample_rng
from loader_server.tools.soak.data import DATASETS, SoakDataset, pixels

log = logging.getLogger(__name__)

CHECKED_ROWS_PER_AUGMENTED_BATCH = 2
VANISH_AFTER_BATCHES = 2


@dataclass(frozen=True)
class ClientSpec:
    """One client process. `order` is "index" (BatchStream, batches in order), "shuffled"
    (Connection, a fresh random order each epoch with a prefetch window, as Keras
    `fit(shuffle=True)` asks) or "vanish" (asks for a window, takes a few, waits to be killed)."""

    name: str
    url: str
    dataset: str
    order: str
    result: str
    stop: str
    parent_pid: int
    seed: int
    prefetch: int = 8
    step_s: float = 0.01
    timeout_s: float = 120.0
    first_epoch: int = 0


class ContentCheck:
    """Checks that a batch's pixels are those of the ids it carries. Unaugmented batches are
    checked whole; augmented ones by recomputing a few random rows with the server's own
    pipeline and the sample's seeded generator, which must give the same bytes."""

    def __init__(self, ds: SoakDataset, rng: np.random.Generator) -> None:
        self.ds = ds
        self.rng = rng
        self.pipeline = build_pipeline(ds.augment, spatial_targets=False) if ds.augment else None

    def __call__(self, epoch: int, x: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
        """(rows checked, rows whose pixels are not those of their id)."""
        if self.pipeline is None:
            expected = pixels(ids)
            return len(ids), int((expected != x).reshape(len(ids), -1).any(axis=1).sum())
        rows = self.rng.choice(len(ids), size=min(CHECKED_ROWS_PER_AUGMENTED_BATCH, len(ids)), replace=False)
        corrupt = 0
        for row in rows.tolist():
            sid = int(ids[row])
            expected, _ = self.pipeline(pixels(np.array([sid]))[0], None, sample_rng(self.ds.seed, epoch, sid))
            corrupt += not np.array_equal(expected, x[row])
        return len(rows), corrupt


class _Reader:
    """The client's session with the server, reopened after an error."""

    def __init__(self, spec: ClientSpec, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng
        self._earlier_reconnects = 0
        self._open()

    def _open(self) -> None:
        s = self.spec
        if s.order == "index":
            self.stream = BatchStream(s.url, s.dataset, timeout=s.timeout_s, prefetch=s.prefetch)
            self._session_reconnects = lambda: self.stream.stats()["reconnects"]
            self._close = self.stream.close
        else:
            self.conn = Connection(s.url, s.dataset, timeout=s.timeout_s)
            self._session_reconnects = lambda: self.conn.reconnects
            self._close = self.conn.close

    def batches(self, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        if self.spec.order == "index":
            self.stream.epoch = epoch
            return iter(self.stream)
        return self._shuffled(epoch)

    def _shuffled(self, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        assert self.conn.info is not None
        order = self.rng.permutation(self.conn.info.batches).tolist()
        window = self.spec.prefetch
        self.conn.request(epoch, order[:window])
        for k, index in enumerate(order):
            if k + window < len(order):
                self.conn.request(epoch, [order[k + window]])
            yield self.conn.get(epoch, index)

    @property
    def reconnects(self) -> int:
        return self._earlier_reconnects + self._session_reconnects()

    def reopen(self) -> None:
        self._earlier_reconnects += self._session_reconnects()
        self._close()
        self._open()

    def close(self) -> None:
        self._close()


def _timed(batches: Iterator[tuple[np.ndarray, ...]]) -> Iterator[tuple[float, tuple[np.ndarray, ...]]]:
    """Each batch with the seconds its `next()` kept the consumer waiting."""
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield time.perf_counter() - started, batch


def run(spec: ClientSpec) -> None:
    rng = np.random.default_rng([spec.seed, zlib.crc32(spec.name.encode())])
    with open(spec.result, "a", buffering=1) as out:
        if spec.order == "vanish":
            _vanish(spec, out.write)
        else:
            _read_epochs(spec, rng, lambda record: out.write(json.dumps(record) + "\n"))


def _stopped(spec: ClientSpec) -> bool:
    return os.path.exists(spec.stop) or os.getppid() != spec.parent_pid


def _read_epochs(spec: ClientSpec, rng: np.random.Generator, report: Callable[[dict], None]) -> None:
    check = ContentCheck(DATASETS[spec.dataset], rng)
    reader = _Reader(spec, rng)
    epoch = spec.first_epoch
    try:
        while not _stopped(spec):
            ids: list[int] = []
            waits: list[float] = []
            checked = corrupt = 0
            try:
                for wait, (x, y) in _timed(reader.batches(epoch)):
                    waits.append(round(wait * 1000, 3))
                    batch_ids = y.astype(np.int64)
                    ids.extend(batch_ids.tolist())
                    c, k = check(epoch, x, batch_ids)
                    checked, corrupt = checked + c, corrupt + k
                    time.sleep(spec.step_s)  # the trainer's step: the loader must keep ahead of it
            except Exception as e:  # any failure is the finding; report it and carry on
                log.error("client %s: epoch %d failed after %d batches: %s", spec.name, epoch, len(waits), e)
                report({"epoch": epoch, "error": f"{type(e).__name__}: {e}", "batches": len(waits)})
                reader.reopen()
            else:
                report({"epoch": epoch, "ids": ids, "wait_ms": waits, "checked": checked, "corrupt": corrupt})
            epoch += 1
    finally:
        reader.close()
    report({"end": True, "reconnects": reader.reconnects})


def _vanish(spec: ClientSpec, write: Callable[[str], object]) -> None:
    """Ask for a window of batches, take a few, say so, then wait to be killed mid-epoch."""
    conn = Connection(spec.url, spec.dataset, timeout=spec.timeout_s)
    assert conn.info is not None
    epoch = spec.first_epoch
    conn.request(epoch, list(range(min(spec.prefetch, conn.info.batches))))
    for index in range(VANISH_AFTER_BATCHES):
        conn.get(epoch, index)
    write(json.dumps({"got": VANISH_AFTER_BATCHES}) + "\n")
    deadline = time.monotonic() + spec.timeout_s
    while time.monotonic() < deadline and not _stopped(spec):
        time.sleep(0.1)  # the soak kills this process; the deadline only bounds a lost soak


# -- the soak's side ----------------------------------------------------------------------------

@dataclass
class ClientTally:
    """What one client reported, verified epoch by epoch as it arrives."""

    name: str
    dataset: str
    order: str
    epochs: int = 0
    batches: int = 0
    samples: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    rows_checked: int = 0
    corrupt_rows: int = 0
    reconnects: int = 0
    ended: bool = False
    errors: list[str] = field(default_factory=list)
    bad_epochs: list[str] = field(default_factory=list)
    waits_ms: list[float] = field(default_factory=list, repr=False)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.waits_ms, q)) if self.waits_ms else 0.0

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "waits_ms"}
        out.update(wait_p50_ms=self.percentile_ms(50), wait_p99_ms=self.percentile_ms(99),
                   wait_max_ms=max(self.waits_ms, default=0.0))
        return out


class ClientLog:
    """Follows one client's result file, verifying each completed epoch once."""

    MAX_BAD_EPOCHS_NOTED = 5

    def __init__(self, path: Path, tally: ClientTally) -> None:
        self.path = path
        self.tally = tally
        self.samples = DATASETS[tally.dataset].samples
        self._offset = 0
        self._partial = b""

    def poll(self) -> ClientTally:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.tally
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self._take(json.loads(line))
        return self.tally

    def _take(self, record: dict) -> None:
        t = self.tally
        if record.get("end"):
            t.ended, t.reconnects = True, record["reconnects"]
        elif "error" in record:
            t.errors.append(f"epoch {record['epoch']} after {record['batches']} batches: {record['error']}")
        elif "ids" in record:
            self._verify(record)

    def _verify(self, record: dict) -> None:
        t, n = self.tally, self.samples
        ids = np.asarray(record["ids"], dtype=np.int64)
        inside = ids[(ids >= 0) & (ids < n)]
        counts = np.bincount(inside, minlength=n)
        lost, duplicated, unexpected = int((counts == 0).sum()), int((counts > 1).sum()), len(ids) - len(inside)
        t.epochs += 1
        t.batches += len(record["wait_ms"])
        t.samples += len(ids)
        t.lost += lost
        t.duplicated += duplicated
        t.unexpected += unexpected
        t.rows_checked += record["checked"]
        t.corrupt_rows += record["corrupt"]
        t.waits_ms.extend(record["wait_ms"])
        if (lost or duplicated or unexpected) and len(t.bad_epochs) < self.MAX_BAD_EPOCHS_NOTED:
            t.bad_epochs.append(f"epoch {record['epoch']}: {lost} lost, {duplicated} duplicated, "
                                f"{unexpected} out of range, e.g. lost {np.flatnonzero(counts == 0)[:5].tolist()}, "
                                f"duplicated {np.flatnonzero(counts > 1)[:5].tolist()}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s client %(levelname)s %(message)s")
    run(ClientSpec(**json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
