"""The pipeline's last stage: eval table and heat-map, task_checkpoint_mapping.json, the pipeline's MLflow run.

The mapping is the seed's format, {"checkpoints": {name: {"path": export URL, "tasks": [ids]}}}, plus
"model_uri" (models:/NAME/VERSION) per entry; every task appears exactly once (checked before writing).
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
import time
from typing import Any

from data_loaders import storage
from trainer.eval_report import LEGEND, format_table, heatmap_png, task_rows
from trainer.pipeline_data import read_json, write_json

MAPPING_NAME = "task_checkpoint_mapping.json"
_TAG_KIND, _TAG_ROOT = "b1k.kind", "b1k.pipeline_root"


def build_mapping(subsets, versions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seed's task -> checkpoint mapping over the fine-tunes; raises if a task is missing or repeated."""
    checkpoints = {}
    seen: dict[int, str] = {}
    for s in subsets:
        v = versions[s.name]
        for t in s.tasks:
            if t in seen:
                raise ValueError(f"task {t} maps to both {seen[t]} and {s.name}")
            seen[t] = s.name
        checkpoints[s.name] = {"path": v["export"], "tasks": list(s.tasks), "model_uri": f"models:/{v['model']}/"
                               f"{v['version']}"}
    return {"checkpoints": checkpoints}


def _pipeline_run(client, experiment: str, root: str, run_name: str) -> tuple[str, bool]:
    """(run id, created?) of the pipeline's own MLflow run (found again by its root on a re-run)."""
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{_TAG_ROOT}` = '{root}'", max_results=1)
    if found:
        return found[0].info.run_id, False
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={_TAG_KIND: "pipeline", _TAG_ROOT: root})
    return run.info.run_id, True


def report(pipe, stages, data, results: dict[str, dict[str, Any]], versions: dict[str, dict[str, Any]], *,
           trained: list[str], client) -> dict[str, Any]:
    """Write and log the pipeline's outputs; print the eval table; return the summary (pipeline.json)."""
    from mlflow.entities import Metric, Param

    cfg = pipe.cfg
    serving = {t: s.name for s in cfg.subsets for t in s.tasks}
    rows = task_rows(results, serving, reference="pretrain" if "pretrain" in results else None)
    table = format_table(rows)
    mapping = build_mapping(cfg.subsets, versions)
    mapping_url = storage.join(pipe.root, MAPPING_NAME)
    eval_dir = storage.join(pipe.root, "eval")
    new_versions = any(v["created"] for v in versions.values())
    previous = read_json(mapping_url)
    run_id, created = _pipeline_run(client, cfg.experiment, pipe.root, pipe.name)
    if previous != mapping or new_versions or created or trained:
        with tempfile.TemporaryDirectory() as tmp:
            heat = heatmap_png(rows, os.path.join(tmp, "heatmap.png"),
                               title=f"{pipe.name}: held-out metrics per task (normalised action units)")
            fs, path = storage.resolve(eval_dir)
            fs.put(heat, storage.join(path, "heatmap.png"))
            write_json(storage.join(eval_dir, "table.json"), rows)
            write_json(mapping_url, mapping)
            for name, obj in (("table.json", rows), (MAPPING_NAME, mapping), ("versions.json", versions)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1, default=str)
            with open(os.path.join(tmp, "table.txt"), "w") as f:
                f.write(table + "\n")
            for name in ("heatmap.png", "table.json", "table.txt", MAPPING_NAME, "versions.json"):
                client.log_artifact(run_id, os.path.join(tmp, name), "eval" if name != MAPPING_NAME else None)
        if created:
            from trainer.overrides import flatten

            params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(cfg).items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i:i + 100])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{stage}/action_mse", r["overall"]["action_mse"], now, 0)
                                          for stage, r in results.items()])
        client.set_terminated(run_id, "FINISHED")
    pipe.out("\n== held-out evaluation (normalised action MSE per task; lower is better)\n" + table + "\n"
             + textwrap.fill(LEGEND, 116))
    return {"pipeline": pipe.name, "recipe": cfg.recipe, "root": pipe.root, "tracking_uri": pipe.tracking_uri,
            "mlflow_run_id": run_id, "trained": trained, "timings": pipe.timings, "models": versions,
            "mapping": mapping_url, "heatmap": storage.join(eval_dir, "heatmap.png"), "eval_table": rows,
            "held_out_episodes": {str(k): v for k, v in data.held_out.items()}}
