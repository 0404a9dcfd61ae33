"""Local pool supervision: dead workers are replaced, with a backoff that only repeated quick
deaths earn."""

from __future__ import annotations

import pytest

from loader_server.serve import pool
from loader_server.serve.pool import LocalPool
from tests.helpers import wait_for


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
