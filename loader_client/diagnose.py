"""Why training waits on data, judged from the server's own figures.

A wait fraction alone says that the accelerator starves, not what to change. The server knows
whether its workers were busy (then the pool is the limit: too few of them for the reading or
the augmentation asked of them) or idle while training still waited (then batches were ready
but slow to arrive: the transport). A pure function of one stats reply, so every branch is
testable with a hand-made dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Workers busy at least this much of the time are the bottleneck; a pool idle more than that
# while training still waits points at the link instead. A saturated pool never reads 100%:
# each batch's messaging, and the start of each epoch before Keras's first requests arrive,
# fall outside the workers' measured time. One worker rotating 48x48 images, measured over
# sub-second epochs in which training waited 50-70% of the time, read 76-78%.
BUSY_PCT = 60.0
# Augmentation counts as the cost when it takes at least this share of the workers' time.
AUGMENT_SHARE = 0.5

AUGMENTATION = "augmentation cost"
TOO_FEW_WORKERS = "too few workers"
NETWORK = "network"


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    evidence: str
    advice: str

    def __str__(self) -> str:
        return f"likely cause: {self.cause} ({self.evidence}); {self.advice}"


def diagnose(wait_fraction: float, stats: dict[str, Any], bytes_per_s: float, dataset: str) -> Diagnosis:
    """The likely reason training waited `wait_fraction` of its time for `dataset`.

    `stats` is a stats reply, ideally passed through `loader_client.rates.with_rates` so that
    worker business is over the interval just judged (`recent_busy_pct`) rather than since
    each worker started; `bytes_per_s` is what the client received meanwhile.
    """
    workers = stats.get("workers", {}).get("list", [])
    waited = f"training waited {wait_fraction:.0%} of the time"
    if not workers:
        return Diagnosis(TOO_FEW_WORKERS, f"{waited} and no worker is connected",
                         "start workers: --workers N on the server, or `npyloader worker --connect ...` on other hosts")
    busy = sum(w.get("recent_busy_pct", w.get("busy_pct", 0.0)) for w in workers) / len(workers)
    pool = f"{len(workers)} worker{'s' if len(workers) != 1 else ''} busy {busy:.0f}%"
    if busy < BUSY_PCT:
        return Diagnosis(NETWORK, f"{pool} while {waited}; received {bytes_per_s / 1e6:.1f} MB/s",
                         "batches are ready but slow to arrive: on the same host bind ipc://, else use a faster "
                         "link, or serve smaller dtypes (e.g. uint8 images, converted on the accelerator)")
    more = "add worker processes (--workers) or hosts (`npyloader worker`)"
    d = stats.get("datasets", {}).get(dataset, {})
    built = d.get("batches_built", 0)
    augment_s = d.get("worker_augment_s", 0.0)
    work_s = d.get("worker_busy_s") or d.get("worker_read_s", 0.0) + augment_s
    if built and work_s and augment_s / work_s >= AUGMENT_SHARE:
        return Diagnosis(AUGMENTATION, f"{pool}, {augment_s / work_s:.0%} of it augmenting: "
                                       f"{1000 * augment_s / built:.0f} ms of augmentation per batch",
                         f"{more}, or a lighter --augment (fewer ops, lower interpolation order)")
    reading = f", {1000 * d.get('worker_read_s', 0.0) / built:.0f} ms reading per batch" if built else ""
    return Diagnosis(TOO_FEW_WORKERS, f"{pool}, mostly reading{reading}", more)
