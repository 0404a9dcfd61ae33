"""Rates over the interval between two stats replies (loader_client.rates), from hand-made replies."""

from __future__ import annotations

from loader_client.rates import with_rates


def reply(uptime: float, *, worker_batches: int = 0, busy_s: float = 0.0, busy_pct: float = 0.0,
          client_bytes: int = 0, wait_s: float = 0.0, connected_s: float = 10.0, served: int = 0) -> dict:
    return {
        "uptime_s": uptime, "batches_served": served, "bytes_served": served * 1000,
        "datasets": {"train": {"samples": 100, "batches": 10, "batch_size": 10}},
        "workers": {"alive": 1, "ready": 1, "respawns": 0, "requeued_batches": 0, "list": [
            {"id": "local-0", "pid": 1, "host": "h", "local": True, "batches": worker_batches, "busy_s": busy_s,
             "batches_per_s": 0.5, "busy_pct": busy_pct, "last_heartbeat_s": 0.1}]},
        "clients": [{"id": "ab" * 8, "dataset": "train", "batches": 0, "bytes": client_bytes, "wait_s": wait_s,
                     "pending": 0, "connected_s": connected_s}],
        "rejected": {},
    }


def test_rates_are_over_the_interval_not_since_start():
    before = reply(100.0, worker_batches=10, busy_s=5.0, busy_pct=5.0, client_bytes=0, wait_s=1.0,
                   connected_s=50.0, served=10)
    after = reply(102.0, worker_batches=30, busy_s=6.8, busy_pct=6.6, client_bytes=4_000_000, wait_s=2.5,
                  connected_s=52.0, served=30)
    r = with_rates(before, after)
    assert r["interval_s"] == 2.0 and r["recent_batches_per_s"] == 10.0 and r["recent_bytes_per_s"] == 10_000.0
    w, c = r["workers"]["list"][0], r["clients"][0]
    assert w["recent_batches_per_s"] == 10.0 and abs(w["recent_busy_pct"] - 90.0) < 1e-9
    assert c["recent_bytes_per_s"] == 2_000_000 and c["recent_wait_fraction"] == 0.75
    assert c["wait_fraction"] == 2.5 / 52.0
    assert "recent_busy_pct" not in after["workers"]["list"][0], "the reply passed in is left as it was"


def test_first_reply_and_a_restarted_server_fall_back_to_figures_since_start():
    after = reply(3.0, worker_batches=4, busy_s=1.0, busy_pct=33.0, client_bytes=300, wait_s=1.0, connected_s=2.0)
    for before in (None, reply(500.0, worker_batches=900, busy_s=400.0)):
        r = with_rates(before, after)
        assert r["interval_s"] is None and r["recent_batches_per_s"] is None
        assert r["workers"]["list"][0]["recent_busy_pct"] == 33.0
        assert r["clients"][0]["recent_bytes_per_s"] == 150.0 and r["clients"][0]["recent_wait_fraction"] == 0.5


def test_a_respawned_worker_or_new_client_gets_its_own_figures_since_start():
    before = reply(100.0, worker_batches=50, busy_s=40.0)
    before["clients"][0]["id"] = "cd" * 8
    after = reply(101.0, worker_batches=2, busy_s=0.5, busy_pct=50.0, wait_s=3.0, connected_s=4.0)
    r = with_rates(before, after)
    assert r["workers"]["list"][0]["recent_busy_pct"] == 50.0, "its counters restarted from zero"
    assert r["clients"][0]["recent_wait_fraction"] == 0.75
