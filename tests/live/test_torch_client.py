"""RemoteDataset under real PyTorch: a DataLoader training a model, zero-copy tensors whose
shared-memory slots stay lent while they live, set_epoch, shards from a real gloo process group,
and DataLoader worker processes refused with a message that says what to do."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the torch extra: pip install -e '.[torch]'")

from torch.utils.data import DataLoader  # noqa: E402

from loader_client import request_stats  # noqa: E402
from loader_client.torch import RemoteDataset  # noqa: E402
from tests.helpers import free_port, launch, kill_group, wait_for, write_id_dataset  # noqa: E402

RANK_SCRIPT = Path(__file__).with_name("torch_rank.py")
REPO = Path(__file__).resolve().parents[2]
CHANCE = 0.1
MIN_VAL_ACCURACY = 0.6  # a two-layer MLP reaches about 0.9 on the digits after 4 epochs here
RANK_TIMEOUT_S = 120


def ids_server(start_server, folder: Path, *extra: str):
    return start_server("--data", str(folder), "--label-column", "-1", "--batch-size", "16", *extra)


def expected_features(ids: np.ndarray, features: int = 16) -> np.ndarray:
    """What write_id_dataset stores for these sample ids."""
    return ((ids[:, None] * 1000 + np.arange(features)[None, :]) % 9973).astype(np.float32)


@pytest.mark.slow
def test_dataloader_trains_a_torch_model_above_chance(start_server, tmp_path):
    pytest.importorskip("sklearn", reason="the digits data comes from the demo extra: pip install -e '.[demo]'")
    from loader_server.tools.demo_data import write_demo_data

    write_demo_data(tmp_path / "digits")
    server = start_server("--config", str(tmp_path / "digits" / "loader.toml"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with RemoteDataset(server.endpoint, "train", timeout=60) as train, \
            RemoteDataset(server.endpoint, "val", timeout=60) as val:
        for epoch in range(4):
            train.set_epoch(epoch)
            for x, y in DataLoader(train, batch_size=None):
                assert x.dtype == torch.float32 and x.shape[1:] == (8, 8, 1) and x.device.type == "cpu"
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y.long())
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            pairs = [(model(x).argmax(1) == y.long()).sum().item() for x, y in DataLoader(val, batch_size=None)]
        accuracy = sum(pairs) / val._conn.info.num_samples
        assert train.stats()["transport"] == "shm"
    assert accuracy >= MIN_VAL_ACCURACY > CHANCE, accuracy


def test_tensors_view_shared_memory_and_keep_their_slot_until_dropped(start_server, tmp_path):
    """Only tensors refer to the batches; another client drives the workers through several
    epochs meanwhile. The tensors must still hold their own samples (their slots were not
    reused), and once dropped, their slots are given back (not those of batches prefetched but
    not yet read, which the dataset still holds)."""
    write_id_dataset(tmp_path / "d", [64] * 8)
    server = ids_server(start_server, tmp_path / "d")
    with RemoteDataset(server.endpoint, transport="shm", prefetch=2) as ds:
        kept = [batch for _, batch in zip(range(3), ds)]
        gc.collect()
        assert all(isinstance(t, torch.Tensor) for batch in kept for t in batch)
        with RemoteDataset(server.endpoint, transport="shm") as busy:
            for epoch in range(3):
                assert sorted(i for _, y in busy for i in y.long().tolist()) == list(range(512)), epoch
        for x, y in kept:
            assert np.array_equal(x.numpy(), expected_features(y.long().numpy())), "a slot was reused under a tensor"

        def slots_held() -> int:
            return next(c["slots_held"] for c in request_stats(server.endpoint)["clients"] if c["id"] == ds.stats()["id"])

        held = slots_held()  # the kept batches, and those prefetched after them
        assert held >= len(kept)
        dropped = len(kept)
        del kept, x, y
        gc.collect()
        wait_for(lambda: slots_held() == held - dropped, 10, "the dropped tensors' slots to be given back")


def test_writable_tensors_are_copies_the_program_may_write(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    with RemoteDataset(server.endpoint, writable=True) as ds:
        x, y = next(iter(ds))
        x.mul_(0)  # on a read-only view this would fault; a copy takes it
        assert not x.any() and len(y) == 16


def test_set_epoch_changes_the_order_and_the_same_epoch_repeats_it(start_server, id_dataset):
    folder, n = id_dataset
    server = ids_server(start_server, folder)
    with RemoteDataset(server.endpoint) as ds:
        loader = DataLoader(ds, batch_size=None)

        def epoch(e: int) -> list[int]:
            ds.set_epoch(e)
            return [i for _, y in loader for i in y.long().tolist()]

        three, four, three_again = epoch(3), epoch(4), epoch(3)
        assert sorted(three) == sorted(four) == list(range(n))
        assert three != four
        assert three == three_again
        assert [i for _, y in loader for i in y.long().tolist()] == epoch(4), "a whole pass moves on to the next epoch"


@pytest.mark.filterwarnings("ignore:Got pickle error:UserWarning")  # torch's own note on the spawn refusal
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_worker_processes_are_refused_saying_what_to_do(start_server, id_dataset, context):
    folder, _ = id_dataset
    server = ids_server(start_server, folder)
    with RemoteDataset(server.endpoint) as ds:
        loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context=context)
        with pytest.raises((RuntimeError, TypeError), match=r"num_workers=0.*--workers"):
            next(iter(loader))
        assert len(list(DataLoader(ds, batch_size=None))) == len(ds), "the dataset still serves in the process"


@pytest.mark.slow
def test_gloo_ranks_get_disjoint_shards_that_cover_each_epoch_once(start_server, tmp_path):
    write_id_dataset(tmp_path / "d", [50, 37, 41, 60, 15])
    server = ids_server(start_server, tmp_path / "d")
    world, port = 2, str(free_port())
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = []
    try:
        for rank in range(world):
            argv = [sys.executable, str(RANK_SCRIPT), server.endpoint, str(rank), str(world), port,
                    str(tmp_path / f"rank{rank}.json"), "0", "1"]
            procs.append(launch(argv, tmp_path / f"rank{rank}.log", env))
        for rank, proc in enumerate(procs):
            wait_for(lambda: proc.poll() is not None, RANK_TIMEOUT_S, f"rank {rank} to finish")
            assert proc.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()
    finally:
        for proc in procs:
            kill_group(proc)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    assert [r["shard"] for r in results] == [[0, world], [1, world]]
    for epoch in ("0", "1"):
        shards = [r["epochs"][epoch] for r in results]
        assert all(shards), "a rank got nothing"
        assert not set(shards[0]) & set(shards[1]), f"epoch {epoch}: the ranks' shards overlap"
        assert sorted(shards[0] + shards[1]) == list(range(203)), f"epoch {epoch} not covered exactly once"
    assert results[0]["epochs"]["0"] != results[0]["epochs"]["1"]
