"""`npyloader serve --config FILE.toml` end to end: the `[server]` table, flags over it, and
dataset keys such as drop-remainder reaching the batches a client receives."""

from __future__ import annotations

from loader_client import BatchStream, request_stats
from tests.helpers import batch_ids, free_port, read_epoch, wait_for, write_id_dataset

DATASET = '[datasets.train]\ndata = "train"\nlabel_column = -1\nbatch_size = 16\n'


def test_drop_remainder_in_a_config_table_drops_only_that_datasets_partial_batch(start_server, tmp_path):
    """`drop-remainder = true` (a flag's spelling, dashes) in one table: 203 samples make 12 full
    batches of 16 there, while the other dataset keeps its partial last batch."""
    n = write_id_dataset(tmp_path / "train", [50, 37, 41, 60, 15])
    write_id_dataset(tmp_path / "val", [20])
    config = tmp_path / "loader.toml"
    config.write_text(DATASET + "drop-remainder = true\n\n"
                      '[datasets.val]\ndata = "val"\nlabel_column = -1\nbatch_size = 16\nshuffle = false\n')
    server = start_server("--config", str(config), workers=1)
    with BatchStream(server.endpoint, dataset="train", timeout=60) as stream:
        assert len(stream) == 12
        batches = [tuple(a.copy() for a in batch) for batch in stream]
    ids = [i for batch in batches for i in batch_ids(batch)]
    assert [len(b[1]) for b in batches] == [16] * 12, "only full batches"
    assert len(ids) == len(set(ids)) == 192 and set(ids) <= set(range(n)), "192 distinct samples, 11 dropped"
    val = read_epoch(server.endpoint, dataset="val")
    assert [len(b[1]) for b in val] == [16, 4] and [i for b in val for i in batch_ids(b)] == list(range(20))


def test_the_server_table_sets_workers_and_endpoints_and_flags_override_it(start_server, tmp_path):
    """README: `[server]` is optional and flags override it. Started with no --workers or --bind
    flag, the server takes both, and the worker endpoint, from the table; given the flags, it
    takes theirs."""
    n = write_id_dataset(tmp_path / "train", [30, 20])
    table_port, flag_port = free_port(), free_port()
    config = tmp_path / "loader.toml"
    config.write_text(f'[server]\nworkers = 3\nbind = "tcp://127.0.0.1:{table_port}"\n'
                      f'worker_bind = "tcp://127.0.0.1:0"\n\n' + DATASET)

    from_table = start_server("--config", str(config), workers=None, bind=None)
    assert from_table.endpoint == f"tcp://127.0.0.1:{table_port}"
    assert from_table.worker_endpoint.startswith("tcp://127.0.0.1:"), "worker_bind came from the table"
    wait_for(lambda: request_stats(from_table.endpoint)["workers"]["ready"] == 3, 60, "the table's three workers")
    assert len(from_table.workers()) == 3
    assert sorted(i for b in read_epoch(from_table.endpoint) for i in batch_ids(b)) == list(range(n))
    assert from_table.stop() == 0

    flagged = start_server("--config", str(config), "--worker-bind", f"tcp://127.0.0.1:{flag_port}", workers=1,
                           bind="tcp://127.0.0.1:0")
    assert flagged.endpoint != f"tcp://127.0.0.1:{table_port}", "--bind overrides the table's bind"
    assert flagged.worker_endpoint == f"tcp://127.0.0.1:{flag_port}", "--worker-bind overrides worker_bind"
    wait_for(lambda: request_stats(flagged.endpoint)["workers"]["ready"] == 1, 60, "the one worker --workers asks")
    assert len(flagged.workers()) == 1
    assert sorted(i for b in read_epoch(flagged.endpoint) for i in batch_ids(b)) == list(range(n))
