"""Fault-tolerance costs on a real local Ray cluster (2 gloo workers, tiny pi-behavior, checkpoints on a local
S3 server): recovery time and steps lost for a killed worker and for a hung collective, and how long training
blocks per checkpoint with asynchronous vs synchronous upload.

Recovery time = from the moment the fault fires to the first optimizer step completed after the resume.

    .venv/bin/python bench/recovery_bench.py     # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A local S3 endpoint only: never reach a real AWS account from a benchmark.
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")

from trainer.data_prep import prepare_data  # noqa: E402
from trainer.launch import fit  # noqa: E402
from trainer.overrides import apply_overrides  # noqa: E402
from trainer.recipes import get_recipe  # noqa: E402

STEPS, SAVE_EVERY, FAULT_STEP = 12, 2, 8


def start_s3() -> str:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return "s3://bench/runs"


def history(run_name: str, key: str) -> list:
    from mlflow import MlflowClient

    db = os.path.join(tempfile.gettempdir(), "b1k-train-mlflow", run_name, "mlflow.db")
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs(client.get_experiment_by_name("b1k-train").experiment_id,
                              filter_string=f"tags.mlflow.runName = '{run_name}'")
    return sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.timestamp)


def fault_time(storage_url: str, run_name: str) -> float:
    from data_loaders import storage

    fs, path = storage.resolve(storage.join(storage_url, run_name, "faults"))
    marker = [p for p in fs.ls(path, detail=False)][0]
    return json.loads(fs.cat_file(marker))["time"]


def recovery(cfg, storage_url: str, run_name: str, *faults: str) -> tuple[float, int]:
    """(seconds from the fault to the first step completed after the resume, optimizer steps lost)."""
    fit(apply_overrides(cfg, list(faults)), run_name=run_name, storage_url=storage_url, num_workers=2)
    t_fault = fault_time(storage_url, run_name)
    after = [m for m in history(run_name, "loss") if m.timestamp / 1000 > t_fault]
    first = after[0]
    lost = (FAULT_STEP - 1) - (first.step - 1)  # steps done before the fault minus the step resumed from
    return first.timestamp / 1000 - t_fault, lost


def blocking(cfg, storage_url: str, run_name: str, async_upload: bool) -> float:
    fit(apply_overrides(cfg, [f"resilience.async_checkpoint={str(async_upload).lower()}"]), run_name=run_name,
        storage_url=storage_url, num_workers=2)
    values = [m.value for m in history(run_name, "time/checkpoint_block_s") if m.value > 0]
    return statistics.median(values)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    storage_url = start_s3()
    workdir = tempfile.mkdtemp(prefix="b1k-recovery-bench-")
    cfg = get_recipe("pi_behavior_debug")
    data = prepare_data(cfg, os.path.join(workdir, "data-run"))
    tag = os.urandom(3).hex()  # fresh run names: the MLflow store under /tmp outlives the S3 server
    cfg = apply_overrides(cfg, [f"data.shards={data.shards}", "strategy=ddp", f"num_steps={STEPS}",
                                f"save_every={SAVE_EVERY}", "log_every=1", "resilience.upload_backoff_s=0.2"])
    sync_s = blocking(cfg, storage_url, f"sync-{tag}", False)
    async_s = blocking(cfg, storage_url, f"async-{tag}", True)
    kill_s, kill_lost = recovery(cfg, storage_url, f"kill-{tag}", "fault.kill_rank=1", f"fault.at_step={FAULT_STEP}")
    hang_s, hang_lost = recovery(cfg, storage_url, f"hang-{tag}", "fault.hang_rank=1", f"fault.at_step={FAULT_STEP}",
                                 "resilience.collective_timeout_s=15", "resilience.watchdog_s=0")
    print(f"\nmachine: {os.cpu_count()} CPU cores; 2 workers, ddp, checkpoint every {SAVE_EVERY} steps, "
          "S3 on 127.0.0.1")
    print(f"checkpoint blocking (median): sync {1000 * sync_s:.0f} ms, async {1000 * async_s:.0f} ms "
          f"-> async/sync = {async_s / sync_s:.2f}x")
    print(f"killed worker (SIGKILL before step {FAULT_STEP}): recovery {kill_s:.1f} s, steps lost {kill_lost}")
    print(f"hung collective (timeout 15 s, before step {FAULT_STEP}): recovery {hang_s:.1f} s, steps lost {hang_lost}")


if __name__ == "__main__":
    main()
