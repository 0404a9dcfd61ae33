"""Why training waits: each branch of `loader_client.diagnose` from hand-made stats replies.
No Keras needed, like `import loader_client` itself."""

from __future__ import annotations

from loader_client.diagnose import AUGMENTATION, NETWORK, TOO_FEW_WORKERS, diagnose


def stats_with(busy: list[float], *, read_s: float = 0.0, augment_s: float = 0.0, built: int = 100) -> dict:
    return {
        "workers": {"list": [{"id": f"local-{i}", "local": True, "host": "h", "batches_per_s": 5.0,
                              "busy_pct": 1.0, "recent_busy_pct": b} for i, b in enumerate(busy)]},
        "datasets": {"train": {"batches_built": built, "worker_read_s": read_s, "worker_augment_s": augment_s,
                               "worker_busy_s": read_s + augment_s}},
    }


def test_busy_workers_that_mostly_augment_are_blamed_on_augmentation_cost_with_ms_per_batch():
    d = diagnose(0.6, stats_with([97.0], read_s=0.5, augment_s=4.0), 12e6, "train")
    assert d.cause == AUGMENTATION
    assert "40 ms of augmentation per batch" in str(d) and "89% of it augmenting" in str(d)
    assert "--workers" in d.advice and "npyloader worker" in d.advice and "--augment" in d.advice


def test_busy_workers_that_mostly_read_are_too_few_workers():
    d = diagnose(0.5, stats_with([90.0, 85.0], read_s=3.0, augment_s=0.5), 50e6, "train")
    assert d.cause == TOO_FEW_WORKERS and "mostly reading, 30 ms reading per batch" in d.evidence
    assert "--workers" in d.advice and "--augment" not in d.advice


def test_no_worker_at_all_is_too_few_workers():
    d = diagnose(1.0, {"workers": {"list": []}, "datasets": {}}, 0.0, "train")
    assert d.cause == TOO_FEW_WORKERS and "no worker is connected" in d.evidence


def test_idle_workers_while_training_waits_point_at_the_network_with_the_rate_received():
    d = diagnose(0.4, stats_with([20.0, 30.0], read_s=1.0, augment_s=9.0), 85.3e6, "train")
    assert d.cause == NETWORK and "busy 25%" in d.evidence and "85.3 MB/s" in d.evidence
    assert "ipc://" in d.advice and "uint8" in d.advice


def test_business_over_the_interval_wins_over_business_since_start():
    s = stats_with([95.0], augment_s=1.0, read_s=0.1)
    assert diagnose(0.5, s, 1e6, "train").cause == AUGMENTATION
    del s["workers"]["list"][0]["recent_busy_pct"]  # then only the since-start 1% remains
    assert diagnose(0.5, s, 1e6, "train").cause == NETWORK


def test_a_server_without_per_dataset_worker_figures_still_gets_a_cause():
    s = {"workers": {"list": [{"busy_pct": 99.0}]}, "datasets": {"train": {"samples": 10}}}
    assert diagnose(0.5, s, 1e6, "train").cause == TOO_FEW_WORKERS
