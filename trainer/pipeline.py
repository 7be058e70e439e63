"""`b1k-train pipeline`: the two-stage BEHAVIOR recipe as one idempotent job.

    data     shards (synthetic if none given) -> held-out split -> views -> norm stats + FAST (train episodes only)
    pretrain all tasks                                    <root>/pretrain        (a `fit` run)
    finetune one run per subset, from the pretrain export <root>/ft-<subset>     (concurrently when Ray has room)
    eval     each model on its tasks' held-out episodes   <root>/eval/<stage>.json, metrics on its MLflow run
    register each export -> a version of <prefix>-<stage> with alias @challenger
    report   eval table + heat-map, task_checkpoint_mapping.json, the pipeline's MLflow run, pipeline.json

Every stage looks at its outputs first: a finished one is skipped, a partial one resumes (fits resume from their
last committed checkpoint). Re-running the same command after a crash or kill continues where it stopped; the
pipeline's config is pinned in <root>/pipeline_config.json so a re-run cannot silently change it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from data_loaders import storage
from trainer.config import TrainConfig
from trainer.overrides import flatten
from trainer.pipeline_config import PipelineConfig
from trainer.pipeline_data import PipelineData, prepare_pipeline_data, read_json, write_json
from trainer.supervisor import RunFailedError, parse_workers
from trainer.user_paths import absolute_config_paths, absolute_url, check_local_storage

log = logging.getLogger(__name__)

# Fields that may change between invocations of the same pipeline: they do not change what it produces.
_MUTABLE_PREFIXES = ("train.fault.", "train.resilience.", "eval.num_gpus", "promotion.", "finetune.workers",
                     "finetune.max_concurrent")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "pretrain" or a subset name
    run_name: str  # fit run directory under the pipeline root
    cfg: TrainConfig
    tasks: tuple[int, ...]
    eval_view: str
    workers: tuple[int, int]


def export_step(run_dir: str) -> int | None:
    """Step of the run's final export, or None while it has none (state.json is written last)."""
    state = read_json(storage.join(run_dir, "export", "state.json"))
    return None if state is None else int(state["global_step"])


class Pipeline:
    def __init__(self, cfg: PipelineConfig, *, run_name: str, storage_url: str, workers: str = "1",
                 tracking_uri: str | None = None, out: Callable[[str], None] = print, runner: Any = None):
        """`runner`: where training stages run; None trains on the Ray cluster of this process (local or
        RAY_ADDRESS), a trainer.k8s.stages.K8sStageRunner submits each stage as its own RayJob."""
        # Stages run on Ray workers, in Ray's session directory: the user's relative paths are resolved here.
        cfg, storage_url = absolute_config_paths(cfg), absolute_url(storage_url)
        check_local_storage(storage_url)
        self.cfg, self.name, self.out, self.runner = cfg, run_name, out, runner
        self.root = storage.join(storage_url, run_name)
        self.workers = parse_workers(workers)
        self.ft_workers = parse_workers(cfg.finetune.workers) if cfg.finetune.workers else self.workers
        self.tracking_uri = self._tracking(tracking_uri)
        self.timings: dict[str, dict[str, Any]] = {}

    # --- setup -------------------------------------------------------------------------------------------------

    def _tracking(self, explicit: str | None) -> str:
        """The MLflow store every stage uses: explicit, $MLFLOW_TRACKING_URI, or SQLite under a local root."""
        uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
        fs, path = storage.resolve(self.root)
        if not uri:
            if not storage.is_local(fs):
                raise ValueError(f"--storage {self.root} is remote: set MLFLOW_TRACKING_URI to your MLflow server so "
                                 f"the registry outlives this machine")
            local = os.path.join(os.path.abspath(path), "mlflow")
            os.makedirs(local, exist_ok=True)
            uri = f"sqlite:///{local}/mlflow.db"
            self._artifact_location: str | None = f"file://{local}/mlartifacts"
        else:
            self._artifact_location = None
        os.environ["MLFLOW_TRACKING_URI"] = uri  # fits read it at launch; workers get it through loop_config
        return uri

    def _pin_config(self) -> None:
        flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flatten(self.cfg).items()
                if not k.startswith(_MUTABLE_PREFIXES)}
        flat = json.loads(json.dumps(flat, default=str))
        url = storage.join(self.root, "pipeline_config.json")
        old = read_json(url)
        if old is None:
            write_json(url, flat)
            return
        diff = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
        if diff:
            raise ValueError(f"pipeline {self.name} at {self.root} was started with a different config ("
                             + ", ".join(f"{k}: {old.get(k)!r} -> {flat.get(k)!r}" for k in diff[:6])
                             + "); re-run it unchanged, or start a new one with another --run-name")

    def _client(self):
        from trainer.registry import client

        c = client(self.tracking_uri)
        if c.get_experiment_by_name(self.cfg.experiment) is None:
            c.create_experiment(self.cfg.experiment, artifact_location=self._artifact_location)
        return c

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        self.timings[stage] = {"seconds": round(time.perf_counter() - t0, 1)}
        return result

    # --- stages ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or finish) every stage; returns the summary also written to <root>/pipeline.json."""
        from trainer.launch import check_storage_writable

        check_storage_writable(self.root)
        self._pin_config()
        client = self._client()
        self.out(f"== pipeline {self.name} ({self.cfg.recipe}) at {self.root}; tracking {self.tracking_uri}")
        data: PipelineData = self._timed("data", lambda: prepare_pipeline_data(self.cfg, self.root, self.out))
        stages = self._stages(data)
        trained = self._timed("train", lambda: self._train(stages))
        results = self._timed("eval", lambda: self._evaluate(stages, client))
        _release_ray()
        versions = self._timed("register", lambda: self._register(stages, data, results, client))
        from trainer.pipeline_report import report

        summary = report(self, stages, data, results, versions, trained=trained, client=client)
        write_json(storage.join(self.root, "pipeline.json"), summary)
        return summary

    def _stages(self, data: PipelineData) -> list[Stage]:
        tc = self.cfg.train
        base_data = dataclasses.replace(tc.data, norm_stats=data.norm_stats, fast_tokenizer=data.fast_tokenizer)
        # The pretrain sees every task's training episodes; each fine-tune its subset's.
        cfg = dataclasses.replace(tc, data=dataclasses.replace(base_data, shards=data.train_views["pretrain"]))
        stages = [Stage("pretrain", "pretrain", cfg, self.cfg.tasks, data.eval_views.get("pretrain", ""),
                        self.workers)]
        ft = self.cfg.finetune
        pretrain_export = storage.join(self.root, "pretrain", "export")
        for s in self.cfg.subsets:
            cfg = dataclasses.replace(
                tc, num_steps=ft.num_steps, save_every=ft.save_every, init_from=f"export:{pretrain_export}",
                optim=dataclasses.replace(tc.optim, peak_lr=ft.peak_lr, warmup_steps=ft.warmup_steps,
                                          decay_steps=ft.decay_steps, final_lr=ft.final_lr, freeze_steps=0),
                data=dataclasses.replace(base_data, shards=data.train_views[s.name]))
            stages.append(Stage(s.name, f"ft-{s.name}", cfg, s.tasks, data.eval_views[s.name], self.ft_workers))
        return stages

    def _fit(self, stage: Stage) -> None:
        from trainer.launch import fit

        if self.runner is not None:
            self.runner.fit(stage, pipeline=self.name, root=self.root, experiment=self.cfg.experiment,
                            tracking_uri=self.tracking_uri)
            return
        fit(stage.cfg, run_name=stage.run_name, storage_url=self.root, num_workers=stage.workers,
            loop_extra={"run_name": f"{self.name}/{stage.run_name}", "experiment": self.cfg.experiment,
                        "stage": stage.name})

    def _train(self, stages: list[Stage]) -> list[str]:
        """Pretrain, then the fine-tunes (as many at once as the cluster has room for). Returns the stages that
        trained in this invocation."""
        import ray

        from trainer.launch import init_ray

        trained: list[str] = []
        pre, fts = stages[0], stages[1:]
        done = export_step(storage.join(self.root, pre.run_name))
        if done is not None and done >= pre.cfg.num_steps:
            self.out(f"== pretrain: done (exported at step {done}); skipped")
        else:
            self.out(f"== pretrain: {'resuming' if done is None and self._started(pre) else 'training'} "
                     f"{pre.cfg.num_steps} steps on tasks {list(pre.tasks)} with {pre.workers[1]} worker(s)")
            if self.runner is None:  # timed apart: on a small run, starting Ray is a good part of the total
                self._timed("ray_start", lambda: init_ray(max(self.workers[1], self.ft_workers[1])))
            self._timed("pretrain", lambda: self._fit(pre))
            trained.append(pre.name)
        todo = []
        for st in fts:
            step = export_step(storage.join(self.root, st.run_name))
            if step is not None and step >= st.cfg.num_steps:
                self.out(f"== fine-tune {st.name}: done (exported at step {step}); skipped")
            else:
                todo.append(st)
        if not todo:
            return trained
        if self.runner is not None:  # each fine-tune gets its own Ray cluster: the scheduler (or Kueue) queues them
            at_once = min(len(todo), self.cfg.finetune.max_concurrent or len(todo))
            self.out(f"== fine-tunes {[s.name for s in todo]}: {at_once} at a time, each as its own RayJob")
        else:
            init_ray(max(self.workers[1], self.ft_workers[1]))
            free = ray.available_resources()  # what other jobs on a shared cluster leave
            at_once = concurrent_slots(free, workers_per_job=self.ft_workers[1], jobs=len(todo))
            if self.cfg.finetune.max_concurrent:
                at_once = min(at_once, self.cfg.finetune.max_concurrent)
            self.out(f"== fine-tunes {[s.name for s in todo]}: {at_once} at a time "
                     f"(free in the cluster: {dict((k, v) for k, v in free.items() if k in ('CPU', 'GPU'))}, "
                     f"{self.ft_workers[1]} worker(s) each)")
        errors: dict[str, BaseException] = {}

        def one(st: Stage) -> None:
            self.out(f"== fine-tune {st.name}: {'resuming' if self._started(st) else 'training'} "
                     f"{st.cfg.num_steps} steps on tasks {list(st.tasks)}")
            try:
                self._fit(st)
                trained.append(st.name)
            except BaseException as e:  # noqa: BLE001 - the others go on; reported together below
                errors[st.name] = e

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="finetune") as pool:
            list(pool.map(one, todo))
        self.timings["finetunes"] = {"seconds": round(time.perf_counter() - t0, 1), "concurrent": at_once,
                                     "count": len(todo)}
        if errors:
            first = next(iter(errors.values()))
            if isinstance(first, (ValueError, FileNotFoundError)) and len(errors) == len(todo):
                raise first  # the same deterministic problem everywhere: show it as such
            raise RunFailedError("fine-tunes " + ", ".join(f"{n} ({type(e).__name__}: {e})" for n, e in errors.items())
                                 + " failed; re-running the same command resumes them from their last checkpoint")
        return trained

    def _started(self, stage: Stage) -> bool:
        from checkpoints.retention import committed_checkpoints

        return bool(committed_checkpoints(storage.join(self.root, stage.run_name)))

    def _evaluate(self, stages: list[Stage], client) -> dict[str, dict[str, Any]]:
        """Held-out metrics per model (cached in <root>/eval/<stage>.json once logged to its MLflow run)."""
        import ray

        from trainer.launch import init_ray
        from trainer.registry import log_eval_to_run

        wanted = [s for s in stages if s.eval_view]
        results: dict[str, dict[str, Any]] = {}
        pending = {}
        for st in wanted:
            cached = read_json(storage.join(self.root, "eval", f"{st.name}.json"))
            if cached is not None:
                results[st.name] = cached
                continue
            init_ray(max(self.workers[1], self.ft_workers[1]))
            gpus = self.cfg.eval.num_gpus
            if gpus < 0:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            task = ray.remote(_evaluate_task).options(num_cpus=0 if gpus else 1, num_gpus=gpus)
            ev = self.cfg.eval
            pending[st.name] = task.remote(storage.join(self.root, st.run_name, "export"), st.eval_view,
                                           list(st.tasks), ev.batch_size, ev.seed, ev.num_inference_steps)
        if pending:
            self.out(f"== eval: {list(pending)} on held-out episodes ({len(pending)} Ray task(s))")
        for name, ref in pending.items():
            result = ray.get(ref)
            run_id = result.get("mlflow_run_id")
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "eval.json")
                with open(local, "w") as f:
                    json.dump(result, f, indent=1)
                if run_id:
                    log_eval_to_run(client, run_id, result, step=int(result["global_step"]), local_json=local)
            write_json(storage.join(self.root, "eval", f"{name}.json"), result)
            results[name] = result
        skipped = [s.name for s in wanted if s.name not in pending]
        if skipped:
            self.out(f"== eval: {skipped} already evaluated; skipped")
        return results

    def _register(self, stages: list[Stage], data: PipelineData, results: dict[str, dict[str, Any]],
                  client) -> dict[str, dict[str, Any]]:
        from checkpoints.export import read_export_state
        from trainer.registry import eval_tags, git_commit, register

        out: dict[str, dict[str, Any]] = {}
        commit = git_commit()
        for st in stages:
            if st.name not in results:
                continue
            export_url = storage.join(self.root, st.run_name, "export")
            state = read_export_state(export_url)
            run_id = state.get("mlflow_run_id")
            if not run_id:
                raise RunFailedError(f"{export_url} records no MLflow run; it cannot be registered")
            has_artifact = bool(client.list_artifacts(run_id, "export"))
            if not has_artifact and st.cfg.track_export:
                # Killed between writing the export and uploading it to the run: finish that upload now, so every
                # version's source is the run's own copy (runs:/<id>/export), as for an uninterrupted stage.
                _upload_export_to_run(client, run_id, export_url)
                has_artifact = True
                self.out(f"== register: uploaded {st.name}'s export to MLflow run {run_id} (interrupted earlier)")
            tags = {"b1k.tasks": json.dumps(list(st.tasks)), "b1k.recipe": self.cfg.recipe, "b1k.pipeline": self.name,
                    "b1k.stage": st.name, "b1k.data_manifest": data.base_shards,
                    "b1k.data_fingerprint": data.train_fingerprints[st.name], "b1k.git_commit": commit,
                    "b1k.export": export_url, "b1k.global_step": str(state["global_step"]),
                    **eval_tags(results[st.name])}
            name = self.cfg.model_name(st.name)
            mv, created = register(client, name=name, run_id=run_id, export_url=export_url,
                                   has_run_artifact=has_artifact, tags=tags,
                                   description=f"{self.cfg.recipe} / {self.name} / {st.name}: tasks {list(st.tasks)}")
            self.out(f"== register: {name} version {mv.version}" + (" (new, @challenger)" if created else
                                                                     " (already registered)"))
            out[st.name] = {"model": name, "version": str(mv.version), "created": created, "export": export_url,
                            "run_id": run_id}
        return out


def print_outcome(summary: dict[str, Any], out: Callable[[str], None] = print) -> None:
    """What a finished pipeline leaves behind: registered models and aliases, mapping, heat-map, registry URI."""
    from trainer.registry import client, format_models

    out(f"\n== registered models (MLflow registry at {summary['tracking_uri']})")
    out(format_models(client(summary["tracking_uri"]), [v["model"] for v in summary["models"].values()]))
    out(f"\ntask -> checkpoint mapping: {summary['mapping']}")
    out(f"eval heat-map: {summary['heatmap']}")
    out(f"summary: {summary['root']}/pipeline.json")
    out(f"use the registry from a shell: export MLFLOW_TRACKING_URI={summary['tracking_uri']}")


def _release_ray() -> None:
    """Done with the cluster: disconnect (stopping a local one we started), which also flushes the workers' logs
    before the report is printed."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def concurrent_slots(resources: dict[str, float], *, workers_per_job: int, jobs: int) -> int:
    """How many fine-tunes of `workers_per_job` workers fit in the cluster at once (GPUs if it has any, else
    CPUs, one per worker); at least 1, at most `jobs`."""
    unit = "GPU" if resources.get("GPU", 0) >= 1 else "CPU"
    return max(1, min(jobs, int(resources.get(unit, 0) // max(1, workers_per_job))))


def _evaluate_task(export_url: str, view_url: str, tasks: list[int], batch_size: int, seed: int,
                   num_inference_steps: int) -> dict[str, Any]:
    """Ray task: evaluate one export (on a GPU when given one) and add the id of the run that trained it."""
    from checkpoints.export import read_export_state
    from trainer.evaluate import evaluate_export

    result = evaluate_export(export_url, view_url, tasks=tasks, batch_size=batch_size, seed=seed,
                             num_inference_steps=num_inference_steps)
    result["mlflow_run_id"] = read_export_state(export_url).get("mlflow_run_id")
    return result


def _upload_export_to_run(client, run_id: str, export_url: str) -> None:
    """Copy the complete export at `export_url` into run `run_id`'s artifacts under export/."""
    fs, path = storage.resolve(export_url)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "export")
        fs.get(path.rstrip("/") + "/", local, recursive=True)
        client.log_artifacts(run_id, local, "export")
