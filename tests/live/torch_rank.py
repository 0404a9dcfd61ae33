"""One rank of a gloo process group for test_torch_client.py: reads epochs through RemoteDataset,
which takes its shard from the group, and writes the sample ids it got.

    python torch_rank.py URL RANK WORLD PORT OUT [EPOCH ...]

OUT is a JSON object {"shard": [rank, world], "epochs": {epoch: [ids in order]}}, written only
after every rank has read everything (a barrier), so a rank never leaves the group early.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist
from torch.utils.data import DataLoader

from loader_client.torch import RemoteDataset

GROUP_TIMEOUT = timedelta(seconds=60)


def main() -> None:
    url, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    epochs = [int(e) for e in sys.argv[6:]] or [0]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    try:
        got = {}
        with RemoteDataset(url, timeout=60) as ds:
            loader = DataLoader(ds, batch_size=None)
            for epoch in epochs:
                ds.set_epoch(epoch)
                got[epoch] = [int(i) for _, y in loader for i in y.tolist()]
            shard = ds.shard
        dist.barrier()
        with open(out, "w") as f:
            json.dump({"shard": shard, "epochs": got}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
