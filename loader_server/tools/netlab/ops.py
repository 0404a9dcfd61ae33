"""A custom augment op for the network-fault scenarios: `pause`, the cost of a slow augmentation.

    --augment loader_server.tools.netlab.ops:pause:ms=20

It sleeps `ms` per sample and changes nothing, so a scenario can make its workers slow enough
for a fault to strike mid-epoch, and still compare its batches byte for byte with a run at
another pace. It draws nothing from `rng`, so the ops after it see the same randomness.
"""

from __future__ import annotations

import time

import numpy as np


def pause(x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator, ms: float = 0.0):
    time.sleep(ms / 1000)
    return x, y
