"""The `b1k-train` command line (also `python -m trainer`, which is what `ray job submit` runs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from data_loaders.storage_errors import StorageWriteError
from trainer.k8s.errors import JobFailed, K8sError
from trainer.supervisor import RunFailedError

# Nothing we run should talk to the internet: no usage stats, no cloud metadata probing, no model hub.
for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_k, _v)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,40, got {text!r}") from e


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_loaders.synth import synthesize

    report = synthesize(
        args.out, tasks=args.tasks, episodes_per_task=args.episodes_per_task, frames=args.frames, seed=args.seed,
        resolution=args.resolution, layout=args.layout, codec=args.codec, overwrite=args.overwrite,
    )
    print(report)
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from data_loaders.sharder import shard_dataset

    manifest = shard_dataset(
        args.src, args.out, workers=args.workers, samples_per_shard=args.samples_per_shard,
        image_format=args.image_format, quality=args.quality, on_bad_episode=args.on_bad_episode,
    )
    print(f"wrote {len(manifest['shards'])} shards, {manifest['num_samples']} samples from "
          f"{manifest['num_episodes']} episodes ({len(manifest['skipped_episodes'])} skipped) to {args.out}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from data_loaders.stats import compute_norm_stats

    out = compute_norm_stats(args.shards, out=args.out, sample_fraction=args.sample_fraction, seed=args.seed,
                             workers=args.workers)
    print(f"wrote {out}")
    return 0


def _cmd_fast(args: argparse.Namespace) -> int:
    from models.pi_behavior.fast import fit_fast_tokenizer

    out = fit_fast_tokenizer(args.shards, out=args.out, norm_stats_url=args.norm_stats, max_chunks=args.max_chunks,
                             seed=args.seed)
    print(f"wrote {out}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from trainer.launch import fit
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), args.set or [])
    extra = {k: v for k, v in (("experiment", args.experiment), ("run_name", args.tracking_run_name)) if v}
    summary = fit(cfg, run_name=args.run_name, storage_url=args.storage, num_workers=args.workers,
                  loop_extra=extra or None)
    print(f"run {args.run_name}: last checkpoint {summary['checkpoint']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from trainer.launch import export
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), args.set or [])
    out = export(cfg, run_name=args.run_name, storage_url=args.storage, checkpoint=args.checkpoint, out=args.out)
    print(f"exported to {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    import os

    from models.pi_behavior.openpi_import import import_checkpoint
    from models.xvla.published import import_xvla, is_xvla_checkpoint

    src = args.checkpoint if "://" in args.checkpoint else os.path.abspath(os.path.expanduser(args.checkpoint))
    out = args.out if "://" in args.out else os.path.abspath(os.path.expanduser(args.out))
    if is_xvla_checkpoint(src):
        summary = import_xvla(src, out)
    else:
        summary = import_checkpoint(src, out, model_config=args.model_config)
    print(f"imported {src} -> {out}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k != "source"))
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from trainer.overrides import apply_overrides
    from trainer.pipeline import Pipeline, print_outcome
    from trainer.recipes import get_pipeline

    cfg = apply_overrides(get_pipeline(args.recipe), args.set or [])
    from trainer.cli_k8s import pipeline_runner

    summary = Pipeline(cfg, run_name=args.run_name, storage_url=args.storage, workers=args.workers,
                       tracking_uri=args.tracking_uri, runner=pipeline_runner(args)).run()
    print_outcome(summary)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from data_loaders import storage
    from trainer.eval_report import format_table, task_rows
    from trainer.evaluate import evaluate_export

    _check_registry_uris([args.model])
    result = evaluate_export(args.model, args.data, tasks=args.tasks or None, batch_size=args.batch_size,
                             seed=args.seed, num_inference_steps=args.num_inference_steps)
    rows = task_rows({"model": result}, {int(t): "model" for t in result["tasks"]})
    print(format_table(rows))
    o = result["overall"]
    print(f"overall: action mse {o['action_mse']:.4f} (mean-action baseline {o['baseline']['action_mse']:.4f}), "
          f"stage accuracy {o['stage_acc']:.3f} over {o['num_samples']} samples")
    if args.out:
        fs, path = storage.resolve(args.out)
        storage.write_bytes_atomic(fs, path, json.dumps(result, indent=1).encode())
        print(f"wrote {args.out}")
    return 0


def _check_registry_uris(urls: list[str]) -> None:
    """models:/ URIs name a registered model and alias or version (else one line listing what exists)."""
    from checkpoints.model_uri import is_model_uri
    from trainer.registry import check_model_uri

    for url in urls:
        if is_model_uri(url):
            check_model_uri(url)


def _check_serve_sources(router) -> None:
    """Before the port is bound (so a bad --model is one line, not a server that starts and stops): each route's
    model exists. Loading it happens after binding, so /healthz answers while a large model loads."""
    from trainer.user_paths import is_url

    _check_registry_uris([r.url for r in router.routes])
    for route in router.routes:
        if not is_url(route.url) and not os.path.exists(os.path.expanduser(route.url)):
            raise FileNotFoundError(f"--model {route.url} does not exist; pass an export directory "
                                    f"(<storage>/<run>/export), s3://..., models:/NAME@ALIAS or a "
                                    f"task_checkpoint_mapping.json")


PROMOTE_REFUSED = 3  # exit status when the challenger does not beat the champion (scripts can tell it apart)


def _cmd_promote(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_export
    from trainer.pipeline_config import PromotionConfig
    from trainer.registry import client, format_models, promote, require_registered

    c = client(args.tracking_uri)
    require_registered(c, args.model)  # an unknown name says so, listing the registered ones, and exits 2
    if args.list:
        print(format_models(c, [args.model]) or f"{args.model}: no versions registered yet")
        return 0
    rule = PromotionConfig(policy=args.policy, min_improvement=args.min_improvement,
                           max_task_regression=args.max_task_regression)
    decision = promote(c, args.model, rule, evaluate=lambda uri, view, tasks, units_of: evaluate_export(
        uri, view, tasks=tasks, units_of=units_of))
    print(("promoted: " if decision["promoted"] else "not promoted: ") + decision["reason"])
    return 0 if decision["promoted"] else PROMOTE_REFUSED


def _recipes_epilog() -> str:
    from trainer.recipes import recipes_help

    return recipes_help()


def _pipelines_epilog() -> str:
    from trainer.recipes import pipelines_help

    return pipelines_help()


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.router import ModelRouter
    from serving.security import SecurityConfig, load_admin_keys, load_api_keys
    from serving.server import PolicyServer

    limits = {k: getattr(args, k) for k in ("max_message_mb", "max_connections", "connect_wait_s", "idle_timeout_s",
                                            "max_image_side") if getattr(args, k) is not None}
    security = SecurityConfig(api_keys=load_api_keys(file=args.api_keys_file),
                              admin_keys=load_admin_keys(file=args.admin_keys_file), tls_cert=args.tls_cert,
                              tls_key=args.tls_key, **limits)
    security.ssl_context()  # a bad certificate is an error now, not at the first connection
    if args.host not in ("127.0.0.1", "localhost", "::1") and not security.api_keys:
        logging.getLogger("serving").warning(
            "serving on %s without API keys: anyone who reaches the port can query the policy (set %s or "
            "--api-keys-file)", args.host, "B1K_API_KEYS")
    router = ModelRouter(args.model, memory_budget_bytes=int(args.memory_budget_gb * 2**30), device=args.device,
                         overrides=args.set or [], preload=args.preload)
    _check_serve_sources(router)
    server = PolicyServer(router, host=args.host, port=args.port, batch_window_ms=args.batch_window_ms,
                          max_batch=1 if args.no_batching else args.max_batch, security=security)
    server.serve_forever()
    return 0


def _serving_settings() -> str:
    import dataclasses

    from serving.config import ServingConfig

    return ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(ServingConfig))


def _cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    return run_demo(args.workdir, seed=args.seed, overrides=args.set or [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="b1k-train", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools: synth | shard | stats | fast")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    s = dsub.add_parser("synth", help="write a small synthetic dataset in the BEHAVIOR-1K 2025 layout")
    s.add_argument("out", help="output directory (local path, file:// or s3://)")
    s.add_argument("--tasks", type=_int_list, default=[0, 1, 40], help="comma-separated task ids (0-49)")
    s.add_argument("--episodes-per-task", type=int, default=2, help="episodes written for each task")
    s.add_argument("--frames", type=int, default=120, help="frames per episode (30 fps)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same dataset (episodes are generated from it)")
    s.add_argument("--resolution", choices=["low", "full"], default="low",
                   help="full = 720 head / 480 wrists as in the real data; low = 128/96 for fast tests")
    s.add_argument("--layout", choices=["b1k", "lerobot-v2.1", "lerobot-v3.0"], default="b1k",
                   help="b1k = BEHAVIOR 2025 (LeRobot v2.1 with task-TTTT chunks); the others for reader tests")
    s.add_argument("--codec", choices=["hevc", "av1", "h264"], default="hevc",
                   help="RGB video codec (the 2025 data is HEVC; AV1 variants exist)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    s.set_defaults(func=_cmd_synth)

    h = dsub.add_parser("shard", help="convert a LeRobot/BEHAVIOR dataset into webdataset shards + manifest")
    h.add_argument("src", help="dataset root (local path or s3://)")
    h.add_argument("out", help="shard output prefix (local path, file:// or s3://)")
    h.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel processes")
    h.add_argument("--samples-per-shard", type=int, default=512, help="timesteps per webdataset .tar shard")
    h.add_argument("--image-format", choices=["webp", "jpeg", "png"], default="webp",
                   help="shard image encoding (webp chosen by measurement, see bench/README.md)")
    h.add_argument("--quality", type=int, default=90, help="WebP/JPEG quality")
    h.add_argument("--on-bad-episode", choices=["error", "skip"], default="error",
                   help="error: stop at the first inconsistent episode; skip: leave it out and record why")
    h.set_defaults(func=_cmd_shard)

    t = dsub.add_parser("stats", help="compute norm_stats.json from shards in one streaming pass")
    t.add_argument("shards", help="shard prefix holding manifest.json (local path, file:// or s3://)")
    t.add_argument("--out", default=None, help="where to write norm_stats.json (default: next to the manifest)")
    t.add_argument("--sample-fraction", type=float, default=1.0,
                   help="fraction of action chunks used (the 1st-place recipe used 0.1 on the full data)")
    t.add_argument("--seed", type=int, default=42, help="seed of the --sample-fraction draw")
    t.add_argument("--workers", type=int, default=1, help="parallel processes (shards are split between them)")
    t.set_defaults(func=_cmd_stats)

    f = dsub.add_parser("fast", help="fit the FAST action tokenizer (pi-behavior's auxiliary targets) on shards")
    f.add_argument("shards", help="shard prefix holding manifest.json and norm_stats.json")
    f.add_argument("--out", default=None, help="output directory (default: SHARDS/fast_tokenizer)")
    f.add_argument("--norm-stats", default=None, help="norm_stats.json URL (default: SHARDS/norm_stats.json)")
    f.add_argument("--max-chunks", type=int, default=20_000, help="action chunks used for BPE (memory ~85 KB each)")
    f.add_argument("--seed", type=int, default=42, help="seed of the chunk sample the tokenizer is fitted on")
    f.set_defaults(func=_cmd_fast)

    fit = sub.add_parser("fit", help="train a recipe on Ray Train (resumes a run of the same name and storage)",
                         epilog=_recipes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("recipe", help="recipe name (listed below)")
    fit.add_argument("--run-name", required=True, help="run name; re-running the same name resumes it")
    fit.add_argument("--storage", required=True, help="where runs live: local path, file:// or s3://bucket/prefix")
    fit.add_argument("--workers", default="1",
                     help="Ray Train workers (one per GPU): N, or MIN:MAX to run elastically on as many as the "
                          "cluster can place (the global batch stays fixed)")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config field, e.g. --set optim.peak_lr=3e-4 --set strategy=zero2")
    fit.add_argument("--experiment", default=None, help="MLflow experiment of the run (default: b1k-train)")
    fit.add_argument("--tracking-run-name", default=None, help="MLflow run name (default: --run-name); the "
                     "pipeline's stages use <pipeline>/<stage>")
    fit.set_defaults(func=_cmd_fit)

    ex = sub.add_parser("export", help="write the serving artifact (EMA weights, config, norm stats, FAST "
                        "tokenizer) of a run's checkpoint", epilog=_recipes_epilog(),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("recipe", help="the recipe the run was trained with")
    ex.add_argument("--run-name", required=True, help="the run's name, as given to fit")
    ex.add_argument("--storage", required=True, help="the run's storage, as given to fit")
    ex.add_argument("--checkpoint", default=None, help="checkpoint URL (default: the run's latest committed one)")
    ex.add_argument("--out", default=None, help="artifact URL (default: <run>/exports/step_<n>)")
    ex.add_argument("--set", action="append", metavar="KEY=VALUE", help="the overrides the run was trained with")
    ex.set_defaults(func=_cmd_export)

    im = sub.add_parser("import", help="turn a published checkpoint into a b1k-train export: a 1st-place/openpi "
                        "pi-behavior dir (<ckpt>/params orbax + assets/) or an X-VLA BEHAVIOR dir "
                        "(model.safetensors + config.json); local or s3://. docs/published_checkpoints.md")
    im.add_argument("checkpoint", help="the checkpoint directory, e.g. ~/models/checkpoint_1")
    im.add_argument("--out", required=True, help="export directory or s3:// prefix to write")
    im.add_argument("--model-config", default="auto", help="pi-behavior architecture (tiny | full; default: the one "
                    "whose shapes the checkpoint has)")
    im.set_defaults(func=_cmd_import)

    pl = sub.add_parser("pipeline", help="pretrain on all tasks -> per-subset fine-tunes -> held-out eval -> export "
                        "-> MLflow registry (@challenger) -> task_checkpoint_mapping.json; re-running resumes",
                        epilog=_pipelines_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("recipe", help="pipeline recipe (listed below)")
    pl.add_argument("--run-name", required=True, help="pipeline name; re-running the same name resumes it")
    pl.add_argument("--storage", required=True, help="local path, file:// or s3://bucket/prefix")
    pl.add_argument("--workers", default="1", help="Ray Train workers for the pretrain (N or MIN:MAX); fine-tunes "
                    "use finetune.workers if set")
    pl.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: "
                    "$MLFLOW_TRACKING_URI, else SQLite under a local --storage)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a field: train.num_steps=..., finetune.peak_lr=..., subsets='a:0,1;b:40', "
                         "eval.holdout_fraction=...")
    from trainer.cli_k8s import add_k8s_parser, add_pipeline_k8s_options

    add_pipeline_k8s_options(pl)
    pl.set_defaults(func=_cmd_pipeline)

    ev = sub.add_parser("eval", help="held-out metrics of an export (path, s3:// or models:/NAME@alias) on shards "
                        "or a view: per-task action MSE per horizon step and action group, stage accuracy, baseline")
    ev.add_argument("model", help="export directory, s3:// URL or models:/NAME@ALIAS")
    ev.add_argument("--data", required=True, help="manifest directory (shards or a pipeline eval view)")
    ev.add_argument("--tasks", type=_int_list, default=None, help="comma-separated task ids (default: all)")
    from trainer.pipeline_config import EvalConfig

    defaults = EvalConfig()  # the pipeline's, so that this reproduces a registered version's eval tags
    ev.add_argument("--batch-size", type=int, default=defaults.batch_size,
                    help="samples per forward pass (speed and memory only: the metrics do not depend on it)")
    ev.add_argument("--seed", type=int, default=defaults.seed,
                    help="noise seed; each sample's noise is keyed by (seed, task, episode, frame)")
    ev.add_argument("--num-inference-steps", type=int, default=defaults.num_inference_steps,
                    help="sampler steps (0 = the model's)")
    ev.add_argument("--out", default=None, help="also write the full result JSON here")
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("promote", help="move MODEL's @champion alias to @challenger if it beats the champion on "
                        f"its tasks (exit {PROMOTE_REFUSED} and no change otherwise)")
    pr.add_argument("model", help="registered model name, e.g. pi-behavior-ckpt1")
    pr.add_argument("--policy", choices=["mean_mse", "per_task"], default="mean_mse",
                    help="mean_mse: lower mean held-out action MSE over the challenger's tasks; per_task: that, and "
                         "no task worse by more than --max-task-regression")
    pr.add_argument("--min-improvement", type=float, default=0.0, help="relative MSE drop required (0.02 = 2%%)")
    pr.add_argument("--max-task-regression", type=float, default=0.05,
                    help="per_task: largest relative MSE rise allowed on any task (0.05 = 5%%)")
    pr.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    pr.add_argument("--list", action="store_true", help="list the versions and aliases instead")
    pr.set_defaults(func=_cmd_promote)

    sv = sub.add_parser("serve", help="websocket policy server for the BEHAVIOR 2025 evaluator (eval.py "
                        "policy=websocket)", epilog=f"serving settings (--set KEY=VALUE): {_serving_settings()}")
    sv.add_argument("--model", required=True, help="export directory, s3:// URL, models:/NAME@ALIAS, or a "
                    "task_checkpoint_mapping.json routing each task to its checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept evaluators from other machines")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0 = any free one)")
    sv.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    sv.add_argument("--batch-window-ms", type=float, default=2.0,
                    help="how long a request waits for other connections' requests to batch with")
    sv.add_argument("--max-batch", type=int, default=16, help="most requests answered by one inference")
    sv.add_argument("--no-batching", action="store_true", help="one request per inference")
    sv.add_argument("--memory-budget-gb", type=float, default=8.0,
                    help="resident models beyond this are unloaded, least recently used first")
    sv.add_argument("--preload", choices=("auto", "all", "none"), default="auto",
                    help="checkpoints loaded before /healthz turns 200: auto = every one that fits the memory budget "
                    "(the rest on first use, warned), all = every one or refuse to start, none = the first only")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a serving setting (below)")
    sec = sv.add_argument_group("security")
    sec.add_argument("--api-keys-file", default=None, help="accepted API keys, one per line (also $B1K_API_KEYS, "
                     "comma-separated, and $B1K_API_KEYS_FILE); clients send 'Authorization: Api-Key <key>'; "
                     "/healthz stays open")
    sec.add_argument("--admin-keys-file", default=None, help="keys for /admin/status and /admin/reload, one per line "
                     "(also $B1K_ADMIN_KEYS, $B1K_ADMIN_KEYS_FILE), separate from the client keys; without one the "
                     "admin endpoints are off (404)")
    sec.add_argument("--tls-cert", default=None, help="PEM certificate (chain) for wss://")
    sec.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    # Limits default to None: the server's SecurityConfig holds the one set of defaults (serving/security.py).
    sec.add_argument("--max-message-mb", type=float, default=None,
                     help="larger messages close the connection (1009); default 16 MiB, ~4x a full-resolution "
                     "(720/480) observation of 3.74 MiB")
    sec.add_argument("--max-image-side", type=int, default=None, help="camera frames with a side above this (or of "
                     "0) are a bad request (default 1024); the evaluator sends 224x224, or 720x720 head and 480x480 "
                     "wrists")
    sec.add_argument("--max-connections", type=int, default=None, help="connections served at once (default 64); "
                     "more wait for a slot (--connect-wait-s), since the stock evaluator dies on a refused upgrade")
    sec.add_argument("--connect-wait-s", type=float, default=None,
                     help="how long a connection over --max-connections waits for a slot before it is closed "
                     "with 1013 (default 3600)")
    sec.add_argument("--idle-timeout-s", type=float, default=None,
                     help="close a connection that sent nothing for this long, with 1013 (which the stock client's "
                     "allow_reconnect retries); default 0 = off: an evaluator is silent while a scene loads")
    sv.set_defaults(func=_cmd_serve)

    add_k8s_parser(sub, _recipes_epilog() + "\n\n" + _pipelines_epilog())

    d = sub.add_parser("demo", help="the main job on the embedded default: the tiny two-stage pipeline on synthetic "
                       "data (local Ray, local MLflow), then promotion; prints models, aliases, eval table, mapping")
    d.add_argument("--workdir", default="outputs/demo", help="where the dataset, runs and registry go")
    d.add_argument("--seed", type=int, default=0, help="training seed of the pipeline (train.seed)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a pipeline field (see pipeline)")
    d.set_defaults(func=_cmd_demo)
    return p


# The arguments of each command that are paths or URLs (not `promote MODEL`, a registered name): resolved
# against the current directory before anything runs, because Ray workers have a working directory of their own.
_PATH_ARGS: dict[Callable[[argparse.Namespace], int], tuple[str, ...]] = {
    _cmd_synth: ("out",), _cmd_shard: ("src", "out"), _cmd_stats: ("shards", "out"),
    _cmd_fast: ("shards", "out", "norm_stats"), _cmd_fit: ("storage",), _cmd_export: ("storage", "checkpoint", "out"),
    _cmd_pipeline: ("storage",), _cmd_eval: ("model", "data", "out"), _cmd_serve: ("model",), _cmd_demo: ("workdir",),
}


def _absolute_paths(args: argparse.Namespace) -> None:
    from trainer.user_paths import absolute_url

    for name in _PATH_ARGS.get(args.func, ()):
        setattr(args, name, absolute_url(getattr(args, name)))


def _quiet_health_probes(record: logging.LogRecord) -> bool:
    """websockets logs every plain-HTTP answer ("connection rejected (200 OK)"): for a server that is every
    /healthz probe of a load balancer or Kubernetes, every few seconds. Those go to DEBUG (-v shows them); the
    refusals that matter are logged by serving/ itself."""
    return not record.getMessage().startswith("connection rejected (")


def _configure_logging(*, verbose: bool) -> None:
    from trainer import ray_logs

    if verbose:
        os.environ[ray_logs.DEBUG_ENV] = "1"  # workers (which inherit it) and the Ray log filter show everything
    ray_logs.configure_env()  # before anything imports ray
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("websockets.server").addFilter(_quiet_health_probes)
        # MLflow's own INFO ("Creating initial MLflow database tables", "Updating database tables") on every new
        # local registry.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _absolute_paths(args)
    _configure_logging(verbose=args.verbose)
    from trainer import redact

    redact.install()  # credentials never reach a log line, printed output or anything written
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, StorageWriteError) as e:
        # User-facing errors carry the problem and the fix; no traceback unless asked for. StorageWriteError: a
        # full, read-only or forbidden storage (data shard, exports), named with the file that could not be written.
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except K8sError as e:  # cluster access, missing KubeRay, RBAC, name conflicts, failed jobs: the fix is named
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, JobFailed) else 2


if __name__ == "__main__":
    sys.exit(main())
