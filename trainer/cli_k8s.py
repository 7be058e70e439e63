"""`b1k-train k8s …` subcommands and the `pipeline --on-k8s` options (trainer/k8s does the work)."""

from __future__ import annotations

import argparse


def _api(args: argparse.Namespace):
    from trainer.k8s.api import KubeApi

    return KubeApi(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace)


def _cmd_submit(args: argparse.Namespace) -> int:
    from trainer.k8s import jobs
    from trainer.k8s.manifests import load_values, render_rayjob
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_pipeline, get_recipe

    # Fail here, not in a pod minutes later: the recipe exists and the overrides apply.
    apply_overrides((get_pipeline if args.command == "pipeline" else get_recipe)(args.recipe), args.set or [])
    api = _api(args)
    values = load_values(*(args.values or []))
    body = render_rayjob(values, name=args.run_name, command=args.command, recipe=args.recipe,
                         run_name=args.run_name, overrides=args.set or [], train_workers=args.workers or "",
                         release=args.release, namespace=api.namespace)
    jobs.submit(api, body)
    print(f"submitted RayJob {api.namespace}/{body['metadata']['name']}: {body['spec']['entrypoint']}")
    print(f"follow it:  b1k-train k8s follow {args.run_name} -n {api.namespace}")
    print(f"            kubectl -n {api.namespace} logs -f job/{args.run_name}")
    if args.follow:
        jobs.follow(api, args.run_name, poll_s=args.poll)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from trainer.k8s import jobs

    st = jobs.status(_api(args), args.name)
    print(st.line())
    return 1 if st.deployment in ("Failed", "ValidationFailed") else 0


def _cmd_follow(args: argparse.Namespace) -> int:
    from trainer.k8s import jobs

    jobs.follow(_api(args), args.name, poll_s=args.poll, timeout_s=args.timeout)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from trainer.k8s import jobs

    found = jobs.list_jobs(_api(args))
    for st in found:
        print(st.line())
    if not found:
        print("no b1k-train RayJobs in this namespace")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from trainer.k8s import jobs

    api = _api(args)
    jobs.cancel(api, args.name)
    print(f"cancelled RayJob {api.namespace}/{args.name} (its Ray cluster goes with it; checkpoints stay in storage, "
          f"re-submitting the run name resumes)")
    return 0


def _cmd_suspend(args: argparse.Namespace, suspended: bool) -> int:
    from trainer.k8s import jobs

    api = _api(args)
    jobs.set_suspended(api, args.name, suspended)
    print(f"{'suspended' if suspended else 'resumed'} RayJob {api.namespace}/{args.name}"
          + (" (its Ray cluster is deleted; resume continues from the last checkpoint)" if suspended else ""))
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from trainer.k8s.rollout import rollout
    from trainer.registry import client

    mv = client(args.tracking_uri).get_model_version_by_alias(args.model, args.alias)
    rollout(_api(args), args.deployment, model_uri=f"models:/{args.model}@{args.alias}", version=str(mv.version),
            timeout_s=args.timeout, poll_s=args.poll)
    print(f"{args.deployment} serves {args.model} version {mv.version} (@{args.alias})")
    return 0


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default=None, help="default: the kubeconfig context's namespace")
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config, or in-cluster")
    p.add_argument("--context", default=None, help="kubeconfig context (default: current)")


def add_k8s_parser(sub, recipes_epilog: str) -> None:
    k = sub.add_parser("k8s", help="training on Kubernetes: submit / status / follow / list / cancel / suspend / "
                       "resume RayJobs, and rollout of the policy server")
    ks = k.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)

    s = ks.add_parser("submit", help="create a RayJob from the Helm chart's templates and your values",
                      epilog=recipes_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("recipe", help="training recipe (fit) or pipeline recipe (--command pipeline)")
    s.add_argument("--run-name", required=True, help="RayJob and run name; re-submitting it resumes the run")
    s.add_argument("--command", choices=["fit", "pipeline"], default="fit",
                   help="what the RayJob runs: `b1k-train fit RECIPE` or `b1k-train pipeline RECIPE`")
    s.add_argument("--values", action="append", metavar="FILE", help="chart values (as for helm install -f); "
                   "repeatable, later files win")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override passed to the command")
    s.add_argument("--workers", default=None, help="Ray Train workers, N or MIN:MAX (default: from the values)")
    s.add_argument("--release", default="b1k-train", help="release name of the installed chart (its MLflow "
                   "Service name derives from it)")
    s.add_argument("--follow", action="store_true", help="then follow it until it ends")
    s.add_argument("--poll", type=float, default=5.0, help="seconds between progress reads")
    _cluster_options(s)
    s.set_defaults(func=_cmd_submit)

    for name, func, text in (("status", _cmd_status, "state, workers, restarts and the trainer's progress line "
                              "(exit 1 if the job failed)"),
                             ("follow", _cmd_follow, "live state and progress until the job ends (exit 1 if it "
                              "fails)"),
                             ("cancel", _cmd_cancel, "delete the RayJob and its Ray cluster (checkpoints stay)"),
                             ("suspend", lambda a: _cmd_suspend(a, True), "set spec.suspend: the cluster goes, "
                              "the job waits"),
                             ("resume", lambda a: _cmd_suspend(a, False), "clear spec.suspend: the job resumes "
                              "from its last checkpoint")):
        p = ks.add_parser(name, help=text)
        p.add_argument("name", help="RayJob name (the run name it was submitted with)")
        if name == "follow":
            p.add_argument("--poll", type=float, default=5.0, help="seconds between progress reads")
            p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
        _cluster_options(p)
        p.set_defaults(func=func)

    ls = ks.add_parser("list", help="the b1k-train RayJobs of the namespace")
    _cluster_options(ls)
    ls.set_defaults(func=_cmd_list)

    r = ks.add_parser("rollout", help="after `b1k-train promote`, roll the policy-server Deployment to the version "
                      "the alias now names, and wait until it is ready")
    r.add_argument("model", help="registered model name, e.g. pi-behavior-ckpt1")
    r.add_argument("--alias", default="champion", help="the registry alias whose version to serve")
    r.add_argument("--deployment", default="b1k-train-policy", help="the policy server's Deployment")
    r.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    r.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the rolled Deployment to be ready before failing")
    r.add_argument("--poll", type=float, default=2.0, help="seconds between readiness checks")
    _cluster_options(r)
    r.set_defaults(func=_cmd_rollout)


def add_pipeline_k8s_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on Kubernetes (--on-k8s): each training stage as its own RayJob")
    g.add_argument("--on-k8s", action="store_true", help="run pretrain and fine-tunes as RayJobs; evaluation and "
                   "registration stay in this process")
    g.add_argument("--values", action="append", metavar="FILE", help="chart values of the stage RayJobs")
    g.add_argument("--finetune-values", action="append", metavar="FILE", help="merged over --values for the "
                   "fine-tunes (e.g. a smaller GPU pool)")
    g.add_argument("--release", default="b1k-train", help="release name of the installed chart (its MLflow "
                   "Service name derives from it)")
    g.add_argument("--poll", type=float, default=5.0, help="seconds between progress reads of the stage RayJobs")
    _cluster_options(g)


def pipeline_runner(args: argparse.Namespace):
    """The stage runner of `pipeline --on-k8s`, or None."""
    if not args.on_k8s:
        return None
    from trainer.k8s.manifests import load_values
    from trainer.k8s.stages import K8sStageRunner

    return K8sStageRunner(api=_api(args), values=load_values(*(args.values or [])),
                          finetune_values=load_values(*(args.finetune_values or [])), release=args.release,
                          poll_s=args.poll)
