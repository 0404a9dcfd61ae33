"""How long does a small CNN wait for data, with 1 and with 2 workers on the `rotate` workload?

    .venv/bin/python tools/wait_fraction.py [--workers 1 2] [--filters 4 16] [--epochs 4] [--samples 4096]

Writes the bench's `aug` data (64x64 float32 rows, label last, combined layout), then for each
CNN width and worker count starts `npyloader serve --augment rotate:degrees=15,p=0.5` (the
tutorial's cubic rotation, as in `npyloader bench`), trains a small two-layer CNN through
RemoteSequence with DataWaitMonitor, and prints each epoch's `data_wait_fraction` and the mean
over the epochs after the first (which also traces the model). Numbers depend on the machine:
on 2 cores the trainer and the workers share the CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from loader_server.tools.demo import start_server

SIDE = 64


def write_data(folder: Path, samples: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(samples // 64):
        rows = rng.random((64, SIDE * SIDE + 1), dtype=np.float32)
        rows[:, -1] = rng.integers(0, 10, 64)
        np.save(folder / f"part-{i:04d}.npy", rows)


def small_cnn(filters: int):
    """Two conv layers; `filters` sets how much compute a step costs next to loading a batch."""
    import keras

    model = keras.Sequential([
        keras.Input((SIDE, SIDE, 1)),
        keras.layers.Conv2D(filters, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(2 * filters, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


def measure(url: str, epochs: int, filters: int) -> list[float]:
    from loader_client import DataWaitMonitor, RemoteSequence

    with RemoteSequence(url, dataset="train") as train:
        history = small_cnn(filters).fit(train, epochs=epochs, callbacks=[DataWaitMonitor(train)], verbose=0)
    return history.history["data_wait_fraction"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--filters", type=int, nargs="+", default=[4, 16],
                        help="CNN widths to try: a narrow one waits on data, a wider one less")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="npyloader-wait-") as tmp:
        folder = Path(tmp) / "aug"
        write_data(folder, args.samples)
        rows = []
        for filters in args.filters:
            for workers in args.workers:
                proc, url = start_server(
                    ["--data", str(folder), "--label-column", "-1", "--x-shape", f"{SIDE},{SIDE},1",
                     "--batch-size", "64", "--augment", "rotate:degrees=15,p=0.5", "--workers", str(workers)],
                    Path(tmp) / f"server-{filters}-{workers}.log")
                try:
                    rows.append((filters, workers, measure(url, args.epochs, filters)))
                finally:
                    proc.terminate()
                    proc.wait(30)
    print("| CNN filters | workers | wait fraction per epoch | mean after the first |")
    print("|---:|---:|---|---:|")
    for filters, workers, fractions in rows:
        later = fractions[1:] or fractions
        print(f"| {filters}/{2 * filters} | {workers} | {', '.join(f'{f:.2f}' for f in fractions)} | "
              f"{sum(later) / len(later):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
