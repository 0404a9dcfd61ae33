"""The trainer of a network-fault scenario: reads one epoch and records what it got.

    python -m loader_server.tools.netlab.trainer URL --epoch 0 --timeout 30 --step-ms 40

A stand-in for `model.fit` that can tell whether an epoch arrived exactly once and unchanged: for
each batch it keeps a digest of every array's bytes and the sample ids (the label column of the
scenario's id dataset), and it times each wait for a batch. `--step-ms` is the training step it
simulates after each batch, so the server, held to the client's prefetch window, is still building
batches when a fault strikes, as it would be under a real model. It prints `batch I` as each batch
arrives, then one JSON line `result {...}`; a client error is reported in that line (and the exit
status is 1), never hidden.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

from loader_client import BatchStream


def digest(batch: tuple) -> str:
    """A digest of every array's dtype, shape and bytes: two batches match only if identical."""
    h = hashlib.blake2b(digest_size=16)
    for a in batch:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def read(url: str, epoch: int, timeout: float, step_s: float, transport: str) -> dict:
    """One epoch, batch by batch in order: per batch its digest and ids, and the longest wait."""
    started = time.monotonic()
    batches: list[dict] = []
    longest = 0.0
    error = None
    stats: dict = {}
    try:
        with BatchStream(url, epoch=epoch, timeout=timeout, transport=transport) as stream:
            batches_iter = iter(stream)
            while True:
                asked = time.monotonic()
                try:
                    batch = next(batches_iter)
                except StopIteration:
                    break
                longest = max(longest, time.monotonic() - asked)
                batches.append({"digest": digest(batch), "ids": batch[-1].astype(int).tolist()})
                print(f"batch {len(batches) - 1}", flush=True)
                time.sleep(step_s)  # the simulated training step: the work a model does per batch
            stats = stream.stats()
    except Exception as e:  # noqa: BLE001 -- the scenario reports any client error, by type and text
        error = f"{type(e).__name__}: {e}"
    return {"epoch": epoch, "batches": batches, "epoch_s": round(time.monotonic() - started, 3),
            "longest_wait_s": round(longest, 3), "error": error, "client": stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loader_server.tools.netlab.trainer", description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="the client's timeout (BatchStream's default: 30)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step after each batch")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "socket"])
    a = p.parse_args(argv)
    result = read(a.url, a.epoch, a.timeout, a.step_ms / 1000, a.transport)
    print("result " + json.dumps(result), flush=True)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
