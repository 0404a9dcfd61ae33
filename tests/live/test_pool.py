"""Local pool supervision: dead workers are replaced, with a backoff that only repeated quick
deaths earn."""

from __future__ import annotations

import threading

import pytest

from loader_server.serve import pool
from loader_server.serve.pool import LocalPool
from tests.helpers import pid_alive, wait_for


def exit_at_once(spec: int) -> None:
    """A worker that dies as soon as it starts, like one whose data or op crashes it."""


@pytest.mark.parametrize("healthy_after, deaths_counted", [(1e9, 3), (0.0, 1)])
def test_backoff_counts_quick_deaths_and_forgets_them_after_a_healthy_life(monkeypatch, healthy_after,
                                                                           deaths_counted):
    """The backoff before a restart is RESPAWN_BACKOFF_S[deaths]; a worker that lived
    HEALTHY_AFTER_S (0 here: every one) starts its slot's count afresh."""
    monkeypatch.setattr(pool, "HEALTHY_AFTER_S", healthy_after)
    p = LocalPool(lambda wid: wid, 1, target=exit_at_once)
    reported: list[tuple[int, int | None]] = []

    def three_respawns() -> bool:
        reported.extend(p.reap())  # the broker's view: each death reported once, with its exit code
        return p.respawns >= 3

    try:
        wait_for(three_respawns, 60, "three respawns")
        # every replacement follows a death reap() reported (else the broker would never redo the
        # dead worker's batches); each worker died once, cleanly, and its successor has a new id
        ids = [wid for wid, _ in reported]
        assert len(reported) >= p.respawns, (reported, p.respawns)
        assert ids == sorted(set(ids)) and all(code == 0 for _, code in reported), reported
        assert max(c.deaths for c in p._children.values()) == deaths_counted
    finally:
        p.stop(deadline_s=1.0)


def record_spec(spec: tuple[str, int]) -> None:
    """A worker that writes down the spec it was given, then exits."""
    folder, worker_id = spec
    with open(f"{folder}/{worker_id}", "w") as f:
        f.write(str(worker_id))


def test_processes_started_before_their_specs_wait_for_them_then_run_with_them(tmp_path):
    """The server starts its workers before its indexes exist; each waits for `provide`."""
    p = LocalPool(None, 2, target=record_spec)
    try:
        wait_for(lambda: p.alive() == 2, 30, "two started processes")
        assert list(tmp_path.iterdir()) == []
        p.provide(lambda wid: (str(tmp_path), wid))
        wait_for(lambda: len(list(tmp_path.iterdir())) == 2, 60, "both processes to run with their specs")
        assert {f.name: f.read_text() for f in tmp_path.iterdir()} == {"0": "0", "1": "1"}
    finally:
        p.stop(deadline_s=1.0)


def test_a_pool_stopped_before_its_specs_exist_ends_its_processes_without_running_them(tmp_path):
    """A server that fails while indexing stops workers that never got a spec."""
    p = LocalPool(None, 2, target=record_spec)
    pids = [c.process.pid for c in p._children.values()]
    p.stop(deadline_s=1.0, told=set())
    assert not any(pid_alive(pid) for pid in pids)
    assert list(tmp_path.iterdir()) == []


def test_a_spec_that_cannot_be_pickled_is_an_error_where_it_is_provided(tmp_path):
    """Not a worker that waits forever for a spec that never comes."""
    p = LocalPool(None, 1, target=record_spec)
    try:
        with pytest.raises(TypeError, match="pickle"):
            p.provide(lambda wid: threading.Lock())
    finally:
        p.stop(deadline_s=1.0, told=set())
