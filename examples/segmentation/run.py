"""Segmentation through npyloader, end to end: scans and masks as one `.npy` each, a real
`npyloader serve` flipping, rotating and shifting image and mask alike, and a U-Net trained on
it with `model.fit(RemoteSequence(...))`.

    python examples/segmentation/run.py            # about 2 minutes on 2 CPU cores

It writes the scans (to a temporary folder, or --out), serves them (train augmented, val as
they are) from one server with a `loader.toml`, trains, and prints the validation Dice next to
what a blank prediction, the mean training mask and a fixed threshold on the scan score.
The server is stopped however this ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from loader_server.tools.demo import quiet_tensorflow

quiet_tensorflow()  # TF_CPP_MIN_LOG_LEVEL 3 and no load-time C++ noise, before Keras imports TensorFlow
import keras  # noqa: E402
import numpy as np  # noqa: E402

from loader_client import BatchStream, RemoteSequence  # noqa: E402
from loader_server.tools.local_server import running_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scans.py and unet.py sit beside this file

from scans import write_split  # noqa: E402
from unet import SMOOTH, build_unet  # noqa: E402

# Geometric ops move the mask with the scan (nearest neighbour for the mask, so it stays 0/1);
# noise is a value op and never touches the mask.
TRAIN_AUGMENT = ["flip:axis=0,p=0.5", "flip:axis=1,p=0.5", "rotate:degrees=20,p=0.5",
                 "shift:pixels=4,p=0.5", "noise:std=0.05"]


def write_config(root: Path, batch_size: int, seed: int) -> Path:
    """One server, two datasets: `--layout per-sample --targets GLOB` as TOML tables."""
    augment = ", ".join(f'"{spec}"' for spec in TRAIN_AUGMENT)
    config = root / "loader.toml"
    config.write_text(f"""\
[datasets.train]
data = "train/scans"
layout = "per-sample"
targets = "train/masks/*.npy"
batch_size = {batch_size}
seed = {seed}
augment = [{augment}]

[datasets.val]
data = "val/scans"
layout = "per-sample"
targets = "val/masks/*.npy"
batch_size = {batch_size}
shuffle = false
""")
    return config


def dice_np(masks: np.ndarray, predictions: np.ndarray) -> float:
    """The same soft Dice as training's (unet.dice), over the whole validation set at once."""
    masks = masks.astype(np.float64)
    return float((2 * np.sum(masks * predictions) + SMOOTH) / (masks.sum() + predictions.sum() + SMOOTH))


class EpochReport(keras.callbacks.Callback):
    """One line per epoch, with the seconds training waited on data (stats()["wait_s"])."""

    def __init__(self, train_seq: RemoteSequence, epochs: int) -> None:
        super().__init__()
        self.train_seq, self.epochs = train_seq, epochs
        self.started = self.waited = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started, self.waited = time.perf_counter(), self.train_seq.stats()["wait_s"]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        waited = self.train_seq.stats()["wait_s"] - self.waited
        print(f"epoch {epoch + 1:2d}/{self.epochs}  loss {logs['loss']:.3f}  dice {logs['dice']:.3f}  "
              f"val_loss {logs['val_loss']:.3f}  val_dice {logs['val_dice']:.3f}  "
              f"({time.perf_counter() - self.started:.1f}s, waited {waited:.2f}s for data)", flush=True)


def train(url: str, args: argparse.Namespace) -> keras.Model:
    keras.utils.set_random_seed(args.seed)
    with RemoteSequence(url, dataset="train") as train_seq, RemoteSequence(url, dataset="val") as val_seq:
        print(f"training a U-Net on {len(train_seq)} batches per epoch, validating on {len(val_seq)} "
              f"({train_seq.stats()['transport']} transport)", flush=True)
        model = build_unet(args.size)
        model.fit(train_seq, validation_data=val_seq, epochs=args.epochs, verbose=0,
                  callbacks=[EpochReport(train_seq, args.epochs)])
    return model


def evaluate(url: str, model: keras.Model, train_masks: np.ndarray) -> dict[str, float]:
    """Dice on the served validation set: the model (thresholded at 0.5, a hard mask), and what
    needs no model at all, to show how far above them it is."""
    scans, masks, predicted = [], [], []
    with BatchStream(url, dataset="val") as stream:
        for x, y in stream:
            predicted.append(np.asarray(model.predict_on_batch(x)) > 0.5)
            scans.append(x.copy())
            masks.append(y.copy())
    scans_a, masks_a = np.concatenate(scans), np.concatenate(masks)
    mean_mask = np.broadcast_to(train_masks.mean(axis=0), masks_a.shape)
    return {
        "model": dice_np(masks_a, np.concatenate(predicted)),
        "blank": dice_np(masks_a, np.zeros(masks_a.shape)),
        "mean": dice_np(masks_a, mean_mask),
        "threshold": dice_np(masks_a, scans_a > 0.5),
    }


def run(root: Path, args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    write_split(root / "train", args.train, args.size, args.seed, split=0)
    write_split(root / "val", args.val, args.size, args.seed, split=1)
    train_masks = np.stack([np.load(p) for p in sorted((root / "train" / "masks").glob("*.npy"))])
    print(f"wrote {args.train} training and {args.val} validation scans of {args.size}x{args.size} "
          f"with masks to {root}", flush=True)
    serve_args = ["--config", str(write_config(root, args.batch_size, args.seed)),
                  "--workers", str(args.workers), "--no-index-cache"]
    with running_server(serve_args, root / "server.log") as server:
        print(f"npyloader serve (pid {server.proc.pid}) ready at {server.url}; log: {server.log_path}", flush=True)
        model = train(server.url, args)
        scores = evaluate(server.url, model, train_masks)
    print(f"npyloader serve (pid {server.proc.pid}) stopped: exit status {server.proc.returncode}")
    print(f"\nvalidation Dice {scores['model']:.3f} after {args.epochs} epochs; without a model: "
          f"blank prediction {scores['blank']:.3f}, mean training mask {scores['mean']:.3f}, "
          f"scan > 0.5 {scores['threshold']:.3f}")
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)
    return scores


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM would otherwise end Python without running `finally`, leaving the server running."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="examples/segmentation/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the scans, loader.toml and server.log here "
                                                 "(default: a temporary folder, removed at the end)")
    parser.add_argument("--train", type=int, default=640, help="training scans (default 640)")
    parser.add_argument("--val", type=int, default=128, help="validation scans (default 128)")
    parser.add_argument("--size", type=int, default=64, help="scan height and width (default 64)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 8 or args.size % 8:
        parser.error(f"--size {args.size}: the U-Net halves it three times; use a multiple of 8, e.g. 64")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            scores = run(args.out, args)
        else:
            with tempfile.TemporaryDirectory(prefix="npyloader-segmentation-") as tmp:
                scores = run(Path(tmp), args)
    except KeyboardInterrupt:
        print("interrupted; the server is stopped", file=sys.stderr)
        return 130
    return 0 if scores["model"] > 2 * max(scores["mean"], 0.25) else 1


if __name__ == "__main__":
    sys.exit(main())
