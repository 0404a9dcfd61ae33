"""DataWaitMonitor: per epoch, how much of training's time went to waiting on a RemoteSequence.

The figures go into the epoch's `logs`, so they land wherever Keras sends logs: `History`
(Keras adds it after the user's callbacks, so `history.history` always has them), and
TensorBoard, CSVLogger or any callback listed after the monitor. When the wait is high, one
warning line names the likely cause from the server's own figures, so the fix is not guesswork.

The epoch's clock stops where validation begins: waiting is measured on the training sequence,
and counting validation time as "not waiting" would understate it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from loader_client.diagnose import diagnose
from loader_client.rates import with_rates
from loader_client.requires import keras_missing

try:
    import keras
except ModuleNotFoundError as missing:
    raise keras_missing("DataWaitMonitor", missing) from missing

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class _Mark:
    at: float
    wait_s: float
    bytes: int

    @classmethod
    def now(cls, seq: Any) -> _Mark:
        s = seq.stats()
        return cls(time.perf_counter(), s["wait_s"], s["bytes"])


@dataclass(frozen=True)
class _Epoch:
    wall_s: float
    waited_s: float
    wait_fraction: float
    bytes_per_s: float
    server_after: dict[str, Any] | None


class DataWaitMonitor(keras.callbacks.Callback):
    """Adds `{name}_wait_fraction` (share of the epoch's training time during which no batch
    was ready, 0 to 1) and `{name}_bytes_per_s` (received from the server) to each epoch's logs.

    `seq` is the training `RemoteSequence`. Above `warn_above`, logs one warning per epoch with
    the likely cause. List it before TensorBoard or CSVLogger so that they see its figures.
    """

    def __init__(self, seq: Any, warn_above: float = 0.2, name: str = "data",
                 stats_timeout: float = STATS_TIMEOUT_S) -> None:
        super().__init__()
        self.seq = seq
        self.warn_above = warn_above
        self.name = name
        self.stats_timeout = stats_timeout
        self._start: _Mark | None = None
        self._epoch: _Epoch | None = None
        self._server_before: dict[str, Any] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._server_before = self._server_stats()
        self._epoch = None
        self._start = _Mark.now(self.seq)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._start is not None and self._epoch is None:
            self._end_training()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._start is None:
            return
        if self._epoch is None:
            self._end_training()
        e, self._start, self._epoch = self._epoch, None, None
        assert e is not None
        if logs is not None:
            logs[f"{self.name}_wait_fraction"] = e.wait_fraction
            logs[f"{self.name}_bytes_per_s"] = e.bytes_per_s
        if e.wait_fraction > self.warn_above:
            log.warning("%s: training waited for data %.0f%% of epoch %d (%.1f s of %.1f s, %.1f MB/s received); %s",
                        self.name, 100 * e.wait_fraction, epoch + 1, e.waited_s, e.wall_s, e.bytes_per_s / 1e6,
                        self._cause(e))

    def _end_training(self) -> None:
        """Close the epoch's window where training stops: at validation, or at the epoch's end.
        The server's figures are taken here too, so that they cover the same window."""
        assert self._start is not None
        end = _Mark.now(self.seq)
        wall = end.at - self._start.at
        waited = end.wait_s - self._start.wait_s
        fraction = min(1.0, max(0.0, waited / wall)) if wall > 0 else 0.0
        bytes_per_s = (end.bytes - self._start.bytes) / wall if wall > 0 else 0.0
        server = self._server_stats() if fraction > self.warn_above else None
        self._epoch = _Epoch(wall, waited, fraction, bytes_per_s, server)

    def _cause(self, e: _Epoch) -> str:
        if e.server_after is None:
            return f"cause unknown: no stats from {self.seq.url} within {self.stats_timeout:g}s"
        stats = with_rates(self._server_before, e.server_after)
        return str(diagnose(e.wait_fraction, stats, e.bytes_per_s, self.seq.dataset))

    def _server_stats(self) -> dict[str, Any] | None:
        """The server's figures, or None: a stats hiccup must never interrupt training."""
        try:
            return self.seq.server_stats(self.stats_timeout)
        except Exception as e:  # noqa: BLE001 - any failure here only costs the diagnosis
            log.debug("no stats from %s: %s", self.seq.url, e)
            return None
