"""Network faults between hosts: 100±20 ms delay, 5% loss, a 10 s partition and a 10 Mbit/s cap, each
on the link to a remote worker and on the link to a trainer, keep the epoch exactly once and
byte-identical to a clean run, with no client error and no wait past the client's timeout. A
partitioned remote worker is given up, its batches are redone by another worker, and after the
heal it rejoins and builds again.

Each scenario is `loader_server.tools.netlab.scenarios.run` on two fresh network namespaces; the
module's clean run is the reference every scenario's batches are compared with, digest by digest.
The runner bounds every wait (the trainer by `bound_s`) and `two_hosts()` stops every process.
"""

from __future__ import annotations

import pytest

from loader_server.tools.netlab.link import link_faults_unavailable_reason
from loader_server.tools.netlab.scenarios import LabConfig, Outcome, run, write_dataset

UNAVAILABLE = link_faults_unavailable_reason()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no link faults: {UNAVAILABLE}")]

CFG = LabConfig()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The dataset and the clean run every scenario is compared with (any link: the bytes of a
    batch depend only on the data, seed and epoch)."""
    root = tmp_path_factory.mktemp("netfaults")
    data = write_dataset(root / "data", CFG)
    clean = run(None, "trainer", CFG, data, root / "clean")
    assert clean.problems(CFG, clean) == [] and clean.exactly_once(CFG), clean.trainer
    return data, root, clean


def scenario(lab, fault: str, link: str) -> Outcome:
    data, root, clean = lab
    outcome = run(fault, link, CFG, data, root / f"{fault}-{link}")
    context = f"\n--- server log:\n{outcome.logs.get('server', '')[-3000:]}\n--- worker log:\n{outcome.logs.get('worker', '')[-2000:]}"
    assert outcome.problems(CFG, clean) == [], context
    assert outcome.digests == clean.digests
    assert outcome.trainer["longest_wait_s"] < CFG.client_timeout_s
    if link == "worker":
        assert outcome.remote_built() > 0, "the remote worker built batches over the faulty link" + context
    return outcome


def test_delay_on_the_worker_link(lab):
    scenario(lab, "delay", "worker")


def test_loss_on_the_worker_link(lab):
    scenario(lab, "loss", "worker")


def test_cap_on_the_worker_link(lab):
    scenario(lab, "cap", "worker")


def test_partitioned_worker_is_given_up_its_batches_redone_and_it_rejoins_after_heal(lab):
    outcome = scenario(lab, "partition", "worker")
    healed = outcome.marks["healed"]
    assert outcome.given_up_s() is not None, "the server gave the silent remote worker up"
    assert outcome.given_up_s() < CFG.partition_s
    assert outcome.redone() > 0, "what the partitioned worker held was redone (and delivered once, above)"
    assert outcome.rejoined_s() is not None, "the worker joined again after the heal"
    assert outcome.remote_built() > outcome.remote_built(healed), "the worker built batches again after the heal"
    assert "went silent" in outcome.logs["server"]


def test_delay_on_the_trainer_link(lab):
    outcome = scenario(lab, "delay", "trainer")
    assert outcome.trainer["longest_wait_s"] >= 2 * (CFG.delay_ms - CFG.jitter_ms) / 1000, \
        "a batch asked through the relay takes at least a round trip"


def test_loss_on_the_trainer_link(lab):
    scenario(lab, "loss", "trainer")


def test_cap_on_the_trainer_link(lab):
    outcome = scenario(lab, "cap", "trainer")
    megabits = outcome.trainer["client"]["bytes"] * 8 / 1e6
    assert outcome.trainer["epoch_s"] >= 0.9 * megabits / CFG.cap_mbit, "the epoch's bytes crossed the capped link"


def test_trainer_survives_a_partition_shorter_than_its_timeout(lab):
    outcome = scenario(lab, "partition", "trainer")
    assert outcome.trainer["longest_wait_s"] >= CFG.partition_s / 2, "the partition stalled the trainer"
    assert outcome.trainer["client"]["reconnects"] == 0, "the session survived: no hello again"


def test_worker_sending_big_batches_over_a_thin_link_is_not_taken_for_silent(tmp_path):
    """4 MB batches take 4 s each on an 8 Mbit/s link, longer than the server's silence limit
    (3 heartbeats). Heartbeats sent behind them on the same connection would arrive too late, so
    the server would give the busy worker up and redo its batches, again and again, until each
    batch failed. They travel on a connection of their own, so the worker stays in service."""
    cfg = LabConfig(side=128, samples=128, batch_size=64, augment=("noise:std=0.05",), pace_ms=0, cap_mbit=8,
                    worker_link_local_workers=0, remote_processes=1)
    outcome = run("cap", "worker", cfg, write_dataset(tmp_path / "data", cfg), tmp_path)
    assert "went silent" not in outcome.logs["server"], outcome.logs["server"][-3000:]
    assert outcome.trainer["error"] is None and outcome.exactly_once(cfg), outcome.trainer["error"]
    assert outcome.remote_built() == cfg.batches and outcome.redone() == 0
    assert outcome.trainer["epoch_s"] >= 0.9 * outcome.trainer["client"]["bytes"] * 8 / 1e6 / cfg.cap_mbit
