"""Elastic training through a lost node: a two-node local Ray cluster (1 CPU each, all on 127.0.0.1) runs
`--workers 1:2`; the test removes the worker node mid-run (its raylet and training worker die), the run goes
on with one worker, the node comes back, and the run grows to two again. The global batch, the number of
optimizer steps and every epoch's samples stay exactly those of an uninterrupted run."""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest

from checkpoints.manager import read_train_state
from checkpoints.retention import committed_checkpoints
from tests.fit_support import debug_config, prepare
from trainer.launch import LOCAL_CLUSTER_ENV, fit
from trainer.recovery import read_audit

pytestmark = [pytest.mark.slow, pytest.mark.integration]
STEPS = 40
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}


@pytest.fixture
def two_node_cluster(s3_endpoint):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's single-node cluster; later tests start a fresh one on demand
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 1})
    worker = cluster.add_node(**NODE)
    passthrough = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_"))} | LOCAL_CLUSTER_ENV
    # After the node loss Ray first waits for the old size before settling for fewer workers; keep that short.
    passthrough["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "30"
    ray.init(address=cluster.address, runtime_env={"env_vars": passthrough})
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def wait_for(predicate, timeout_s: float, what: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if not thread.is_alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def latest_world_size(run_dir: str) -> int | None:
    names = committed_checkpoints(run_dir)
    return read_train_state(os.path.join(run_dir, names[-1]))["world_size"] if names else None


def test_lost_node_shrinks_to_one_worker_then_grows_back(two_node_cluster, tmp_path_factory, tmp_path):
    cluster, worker_node = two_node_cluster
    prepared = prepare(tmp_path_factory.mktemp("elastic"))
    cfg = debug_config(prepared, "strategy=fsdp", "save_every=2", "data.audit=true", "keep_last=3",
                       "resilience.elastic_resize_interval_s=3", "resilience.async_checkpoint=false",
                       steps=STEPS)
    run_dir = str(tmp_path / "elastic")
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = fit(cfg, run_name="elastic", storage_url=str(tmp_path), num_workers="1:2")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: (latest_world_size(run_dir) == 2 and
                      read_train_state(os.path.join(run_dir, committed_checkpoints(run_dir)[-1]))["step"] >= 2),
             300, "a 2-worker checkpoint", thread)
    cluster.remove_node(worker_node, allow_graceful=False)  # the node dies with its training worker
    wait_for(lambda: latest_world_size(run_dir) == 1, 300, "a checkpoint from the shrunk 1-worker group", thread)
    cluster.add_node(**NODE)  # capacity returns: Ray's resize monitor grows the group again
    thread.join(timeout=600)
    assert not thread.is_alive(), "the elastic run did not finish"
    assert "error" not in out, out.get("error")
    summary = out["summary"]

    state = read_train_state(summary["checkpoint"])
    assert state["step"] == STEPS and state["world_size"] == 2
    # Same optimizer steps and samples as an uninterrupted run; no sample twice within an epoch.
    audit = read_audit(run_dir)
    assert sorted(audit) == list(range(1, STEPS + 1))
    assert all(len(ids) == cfg.global_batch_size for ids in audit.values())
    seen = collections.Counter(pair for ids in audit.values() for pair in ids)
    assert max(seen.values()) == 1, [p for p, n in seen.items() if n > 1][:5]
    # The workers that did each step: 2, then 1 after the loss, then 2 again.
    ranks = [len(r) for _, r in sorted(audit_ranks(run_dir).items())]
    phases = [n for i, n in enumerate(ranks) if i == 0 or n != ranks[i - 1]]
    assert phases == [2, 1, 2], ranks


def audit_ranks(run_dir: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for name in os.listdir(os.path.join(run_dir, "audit")):
        step, rank = name.removesuffix(".json").split("_rank")
        out.setdefault(int(step.removeprefix("step_")), set()).add(int(rank))
    return out
