"""MLflow model registry: register exports as versions, log evaluations, promote @challenger to @champion.

Every exported model is a version of a registered model (`<prefix>-<subset>`, `<prefix>-pretrain`) whose source is
the training run's `export/` artifact (or the export URL when the run did not upload it). Tags carry what a
promotion or an audit needs:

    b1k.tasks           JSON list of task ids the model serves
    b1k.recipe          pipeline recipe; b1k.pipeline: the pipeline run name
    b1k.data_manifest   the shards' manifest URL; b1k.data_fingerprint: their content fingerprint
    b1k.git_commit      the code that trained it
    b1k.export          the export URL; b1k.global_step: its training step
    b1k.eval.*          held-out action MSE (overall and per task), baseline MSE, stage accuracy, and the
                        eval split's view URL and fingerprint (equal fingerprints = comparable numbers)

New versions get the alias `challenger`; `promote` moves `champion` (see PromotionConfig).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Any, Callable

from trainer.pipeline_config import PromotionConfig
from trainer.redact import REDACTOR

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("the model registry needs MLFLOW_TRACKING_URI (e.g. http://mlflow:5000, or the sqlite:/// "
                         "URI `b1k-train pipeline` printed)")
    return MlflowClient(uri)


def git_commit() -> str:
    """The commit of this checkout ($B1K_GIT_COMMIT in images built without .git), or "unknown"."""
    if os.environ.get("B1K_GIT_COMMIT"):
        return os.environ["B1K_GIT_COMMIT"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        # Fixed argv; git from PATH on purpose (any install location), read-only command.
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"],  # noqa: S603, S607
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def eval_tags(result: dict[str, Any]) -> dict[str, str]:
    """Registry tags summarising an evaluation (per-task MSE included, for promotion without re-running)."""
    overall = result["overall"]
    return {
        "b1k.eval.action_mse": f"{overall['action_mse']:.6g}",
        "b1k.eval.baseline_mse": f"{overall['baseline']['action_mse']:.6g}",
        "b1k.eval.stage_acc": f"{overall['stage_acc']:.4f}",
        "b1k.eval.per_task_mse": json.dumps({t: round(r["action_mse"], 6) for t, r in result["tasks"].items()}),
        "b1k.eval.split": str(result["split"]),
        "b1k.eval.view": str(result["view"]),
        "b1k.norm_stats": str(result["norm_stats"]),
    }


def log_eval_to_run(mlflow_client, run_id: str, result: dict[str, Any], *, step: int, local_json: str) -> None:
    """Held-out metrics on the training run (eval/... at the model's step) and the full result as eval/eval.json."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = {"eval/action_mse": result["overall"]["action_mse"],
               "eval/baseline_mse": result["overall"]["baseline"]["action_mse"],
               "eval/stage_acc": result["overall"]["stage_acc"]}
    for task, r in result["tasks"].items():
        metrics[f"eval/task_{task}/action_mse"] = r["action_mse"]
        metrics[f"eval/task_{task}/stage_acc"] = r["stage_acc"]
        for group, v in r["action_mse_per_group"].items():
            metrics[f"eval/task_{task}/mse_{group}"] = v
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    mlflow_client.log_artifact(run_id, local_json, "eval")


def find_version(mlflow_client, name: str, run_id: str):
    """The version of `name` registered from training run `run_id`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register(mlflow_client, *, name: str, run_id: str, export_url: str, has_run_artifact: bool,
             tags: dict[str, str], description: str = "") -> tuple[Any, bool]:
    """(model version, created?) for the export trained by `run_id`; idempotent: an existing version from the same
    run is returned as is (its aliases untouched). A new version gets the alias `challenger`."""
    from mlflow.exceptions import MlflowException

    existing = find_version(mlflow_client, name, run_id)
    if existing is not None:
        return existing, False
    try:
        mlflow_client.create_registered_model(name, description="b1k-train policy (pi-behavior serving exports)")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"runs:/{run_id}/export" if has_run_artifact else export_url
    mv = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=REDACTOR.obj(dict(tags)),
                                            description=REDACTOR(description))
    mlflow_client.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s version %s from %s (alias %s)", name, mv.version, source, CHALLENGER)
    return mv, True


def _alias_version(mlflow_client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _per_task(mv) -> dict[str, float]:
    raw = mv.tags.get("b1k.eval.per_task_mse")
    if not raw:
        raise ValueError(f"version {mv.version} of {mv.name} has no evaluation (tag b1k.eval.per_task_mse); "
                         f"register it through `b1k-train pipeline`")
    return {str(k): float(v) for k, v in json.loads(raw).items()}


def promote(mlflow_client, name: str, rule: PromotionConfig,
            evaluate: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Move @champion to @challenger if the challenger beats the champion on the challenger's tasks under `rule`.

    Both are judged on the challenger's held-out split in the challenger's normalised units: the champion's
    recorded numbers when it was evaluated on the same split with the same norm stats (equal fingerprints), else
    `evaluate(model_uri, view_url, tasks, units_of=challenger_uri)` re-runs the champion there.
    Returns {"promoted": bool, "reason": str, ...numbers}; nothing changes unless "promoted".
    """
    challenger = _alias_version(mlflow_client, name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"{name} has no @{CHALLENGER} version; run `b1k-train pipeline` to register one")
    champion = _alias_version(mlflow_client, name, CHAMPION)
    decision: dict[str, Any] = {"model": name, "challenger": challenger.version,
                                "champion": champion.version if champion else None, "policy": rule.policy}
    if champion is not None and champion.version == challenger.version:
        return {**decision, "promoted": False, "reason": f"version {challenger.version} already is @{CHAMPION}"}
    chal = _per_task(challenger)
    if champion is None:
        mlflow_client.set_registered_model_alias(name, CHAMPION, challenger.version)
        return {**decision, "promoted": True, "reason": f"no @{CHAMPION} yet; version {challenger.version} "
                f"(held-out action MSE {sum(chal.values()) / len(chal):.4g}) becomes it"}
    tasks = sorted(chal)
    same = all(champion.tags.get(k) == challenger.tags.get(k) for k in ("b1k.eval.split", "b1k.norm_stats"))
    if same:
        champ_all = _per_task(champion)
        source = "recorded on the same held-out split"
    else:
        if evaluate is None:
            raise ValueError(f"{name}: champion v{champion.version} was evaluated on another split or with other "
                             f"norm stats; re-evaluation is needed")
        res = evaluate(f"models:/{name}/{champion.version}", challenger.tags["b1k.eval.view"], [int(t) for t in tasks],
                       units_of=f"models:/{name}/{challenger.version}")
        champ_all = {t: r["action_mse"] for t, r in res["tasks"].items()}
        source = "champion re-evaluated on the challenger's held-out split, in its units"
    missing = [t for t in tasks if t not in champ_all]
    if missing:
        raise ValueError(f"{name}: champion v{champion.version} has no result for tasks {missing}")
    chal_mean = sum(chal[t] for t in tasks) / len(tasks)
    champ_mean = sum(champ_all[t] for t in tasks) / len(tasks)
    decision.update(challenger_mse=chal_mean, champion_mse=champ_mean, comparison=source,
                    per_task={t: {"challenger": chal[t], "champion": champ_all[t]} for t in tasks})
    needed = champ_mean * (1.0 - rule.min_improvement)
    if not chal_mean < needed:
        return {**decision, "promoted": False, "reason": (
            f"challenger v{challenger.version} held-out action MSE {chal_mean:.4g} does not beat champion "
            f"v{champion.version}'s {champ_mean:.4g} (needs < {needed:.4g}, min_improvement "
            f"{rule.min_improvement:g}; {source})")}
    if rule.policy == "per_task":
        worse = [t for t in tasks if chal[t] > champ_all[t] * (1.0 + rule.max_task_regression)]
        if worse:
            return {**decision, "promoted": False, "reason": (
                f"challenger v{challenger.version} is better on average but worse than champion v{champion.version} "
                f"by more than {rule.max_task_regression:.0%} on tasks {worse} (policy per_task)")}
    mlflow_client.set_registered_model_alias(name, CHAMPION, challenger.version)
    mlflow_client.set_model_version_tag(name, challenger.version, "b1k.previous_champion", champion.version)
    return {**decision, "promoted": True, "reason": (
        f"challenger v{challenger.version} held-out action MSE {chal_mean:.4g} < champion v{champion.version}'s "
        f"{champ_mean:.4g} ({source}); @{CHAMPION} moved")}


def describe(mlflow_client, names: list[str]) -> list[dict[str, Any]]:
    """[{name, versions: [{version, aliases, tasks, eval_mse, source}]}] for printing."""
    out = []
    for name in names:
        versions = mlflow_client.search_model_versions(f"name='{name}'")
        aliases = mlflow_client.get_registered_model(name).aliases if versions else {}
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        out.append({"name": name, "versions": [
            {"version": str(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
             "tasks": json.loads(v.tags.get("b1k.tasks", "[]")), "eval_mse": v.tags.get("b1k.eval.action_mse"),
             "source": v.source} for v in sorted(versions, key=lambda v: int(v.version))]})
    return out


def format_models(mlflow_client, names: list[str]) -> str:
    """One line per version: name, version, aliases, tasks, held-out MSE."""
    lines = []
    for m in describe(mlflow_client, names):
        for v in m["versions"]:
            lines.append(f"  {m['name']:28s} v{v['version']:<3s} aliases={','.join(v['aliases']) or '-':20s} "
                         f"tasks={v['tasks']} held-out mse={v['eval_mse']}")
    return "\n".join(lines)


def registered_names(mlflow_client) -> list[str]:
    return sorted(m.name for m in mlflow_client.search_registered_models())


def require_registered(mlflow_client, name: str, *, what: str | None = None) -> None:
    """Raise FileNotFoundError, listing the registered models, when `name` is not one of them."""
    names = registered_names(mlflow_client)
    if name in names:
        return
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise FileNotFoundError(
        f"{what or name}: no registered model {name!r} in {REDACTOR(mlflow_client.tracking_uri)}; "
        + (f"registered: {shown}" if names else "it has none yet (`b1k-train pipeline` or `b1k-train demo` "
                                                "registers them)"))


def check_model_uri(uri: str, tracking_uri: str | None = None) -> None:
    """Before loading models:/NAME@ALIAS or models:/NAME/VERSION: the model, alias or version exists, else one
    FileNotFoundError naming what does exist."""
    rest = uri.removeprefix("models:/")
    name, at, alias = rest.partition("@")
    version = "" if at else rest.partition("/")[2]
    name = name if at else rest.partition("/")[0]
    c = client(tracking_uri)
    require_registered(c, name, what=uri)
    versions = describe(c, [name])[0]["versions"]
    if at and _alias_version(c, name, alias) is None:
        aliases = ", ".join(f"@{a} -> v{v['version']}" for v in versions for a in v["aliases"])
        raise FileNotFoundError(f"{uri}: {name} has no alias @{alias} (" + (
            f"its aliases: {aliases}); use one of them or models:/{name}/VERSION" if aliases else
            f"it has no aliases; `b1k-train pipeline` sets @{CHALLENGER}, `b1k-train promote {name}` @{CHAMPION})"))
    if version and version not in {v["version"] for v in versions}:
        raise FileNotFoundError(f"{uri}: {name} has no version {version} (its versions: "
                                f"{', '.join(v['version'] for v in versions) or 'none'})")
