"""`make demo`: real learning through a real server, start to finish, in about a minute.

Writes the bundled digits dataset (if missing), starts `npyloader serve` on it with two
worker processes, trains a small CNN with `model.fit(RemoteSequence(...))`, and reports what
happened: validation accuracy, how long training waited on data (per epoch, through
DataWaitMonitor), what the server did.

TensorFlow's start-up lines (CUDA probing on a machine without a GPU, oneDNN and CPU notices)
would bury the demo's own; `quiet_tensorflow` keeps them out of the demo, and only the demo:
library code never sets TensorFlow's variables for the user's program.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from loader_server.tools.local_server import running_server

log = logging.getLogger("npyloader.demo")

# A line of TensorFlow's C++ log (absl's format): severity letter, MMDD, time (before absl is
# initialised the seconds are the Unix time: 00:00:1796058161.257996), thread, file:line].
TF_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]")
TF_SEVERITIES = "IWEF"
ABSL_UNINITIALIZED = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ log at TF_CPP_MIN_LOG_LEVEL 3 (unless the user set it).

    The variable alone is not enough: TensorFlow reads it only once its libraries have loaded,
    and they log while loading ("Could not find cuda drivers", the oneDNN notice, each after
    absl's "All log messages before absl::InitializeLog()" warning), so those lines go straight
    to file descriptor 2. The import therefore runs with fd 2 in a temporary file, and what it
    wrote is passed on except the C++ log records that the level hides, and absl's warning when
    it hides warnings; anything else (a Python warning, say) still reaches stderr.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"]) if os.environ["TF_CPP_MIN_LOG_LEVEL"].isdigit() else 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(_shown_tf_output(captured.read().decode(errors="replace"), level))
            sys.stderr.flush()


def _shown_tf_output(text: str, level: int) -> str:
    """`text` without the C++ log records below `level`, as TensorFlow would have filtered them.
    Each line is judged alone: the records printed while loading are one line each."""
    def hidden(line: str) -> bool:
        record = TF_LOG_LINE.match(line)
        if record:
            return TF_SEVERITIES.index(record.group(1)) < level
        return line.startswith(ABSL_UNINITIALIZED) and level >= 1

    return "".join(line for line in text.splitlines(keepends=True) if not hidden(line))


def build_model(num_classes: int = 10):
    import keras

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def run(workdir: Path, epochs: int, workers: int) -> dict:
    from loader_server.tools.demo_data import write_demo_data

    config = workdir / "loader.toml"
    if not config.exists():
        log.info("writing the digits demo dataset to %s", workdir)
        write_demo_data(workdir)
    log.info("starting npyloader serve with %d workers", workers)
    with running_server(["--config", str(config), "--workers", str(workers)], workdir / "server.log") as server:
        log.info("server ready at %s (log: %s)", server.url, server.log_path)
        return train(server.url, epochs)


def train(url: str, epochs: int) -> dict:
    import keras

    from loader_client import DataWaitMonitor, RemoteSequence, request_stats

    keras.utils.set_random_seed(0)
    with RemoteSequence(url, dataset="train") as train_seq, RemoteSequence(url, dataset="val") as val_seq:
        log.info("training a small CNN: %d batches per epoch from the server, %d validation batches",
                 len(train_seq), len(val_seq))
        model = build_model()
        started = time.perf_counter()
        # DataWaitMonitor puts each epoch's data_wait_fraction and data_bytes_per_s in the logs
        # Keras prints, and warns, naming the likely cause, when training waits a lot.
        history = model.fit(train_seq, validation_data=val_seq, epochs=epochs, verbose=2,
                            callbacks=[DataWaitMonitor(train_seq)])
        elapsed = time.perf_counter() - started
        stats = train_seq.stats()
        server = request_stats(url)
    val_acc = history.history["val_accuracy"][-1]
    summary = {
        "epochs": epochs, "train_batches": stats["batches"], "train_mb": stats["bytes"] / 1e6,
        "fit_s": elapsed, "wait_s": stats["wait_s"], "val_accuracy": val_acc,
        "batches_served": server["batches_served"], "workers": len(server["workers"]["list"]),
    }
    log.info("")
    log.info("demo finished: validation accuracy %.3f after %d epochs (chance is 0.100)", val_acc, epochs)
    log.info("  fit took %.1fs; training waited %.2fs on data (%.1f%% of fit); %d train batches, %.2f MB, %s",
             elapsed, stats["wait_s"], 100 * stats["wait_s"] / elapsed, stats["batches"], summary["train_mb"],
             "read from the server's shared memory" if stats["transport"] == "shm"
             else f"over the socket ({stats['transport_reason']})")
    log.info("  the server built %d batches with %d worker processes; see `npyloader stats` while it runs",
             server["batches_served"], summary["workers"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loader_server.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo-data", type=Path, help="where the demo dataset lives")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_tensorflow()
    summary = run(args.dir, args.epochs, args.workers)
    return 0 if summary["val_accuracy"] > 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
