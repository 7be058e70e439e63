"""Writes helm/b1k-train/values.schema.json (the source of truth is this file; tests/chart/test_values_docs.py
checks the JSON is current). Run: .venv/bin/python scripts/values_schema.py"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "helm" / "b1k-train" / "values.schema.json"

QTY = "^([0-9]+(\\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?)$"


def s(t: str, d: str, **kw) -> dict:
    """A scalar of JSON type `t` described by `d`."""
    return {"type": t, "description": d, **kw}


def obj(d: str, props: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    """A closed object (unknown keys are errors, which catches misspelled values)."""
    o = {"type": "object", "description": d, "properties": props, "additionalProperties": extra}
    if required:
        o["required"] = required
    return o


defs = {
  "quantity": {"description": "A Kubernetes quantity, e.g. 500m, 2, 16Gi", "type": ["string", "integer", "number"],
               "pattern": QTY},
  "requestsLimits": obj("cpu and memory (and optionally ephemeral-storage)", {
      "cpu": {"$ref": "#/$defs/quantity"}, "memory": {"$ref": "#/$defs/quantity"},
      "ephemeral-storage": {"$ref": "#/$defs/quantity"}}, ["cpu", "memory"]),
  "resources": obj("Requests and limits; both are required so every container is bounded (GPUs are added by the "
                   "chart from the GPU count)", {
      "requests": {"$ref": "#/$defs/requestsLimits"}, "limits": {"$ref": "#/$defs/requestsLimits"}},
      ["requests", "limits"]),
  "nodeSelector": {"type": "object", "description": "Node labels the pods must match",
                   "additionalProperties": {"type": "string"}},
  "tolerations": {"type": "array", "description": "Kubernetes tolerations", "items": obj("A toleration", {
      "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
      "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""]},
      "tolerationSeconds": {"type": "integer", "minimum": 0}})},
  "dnsName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
  "envVar": {"type": "object", "description": "A container env var: a literal value or a valueFrom reference; "
             "put secrets in valueFrom.secretKeyRef, never in value",
             "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                            "value": {"type": "string"}, "valueFrom": {"type": "object"}},
             "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
             # A literal value under a name that says "secret" is a secret inlined into the manifest.
             "if": {"properties": {"name": {"pattern": "(?i)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY)"}}},
             "then": {"not": {"required": ["value"]}}},
}



def secret_ref(d: str, key_default: str) -> dict:
    return obj(d, {"name": {"type": "string", "description": "Secret name; empty for none",
                            "pattern": "^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"},
                   "key": {"type": "string", "minLength": 1, "default": key_default}})

schema = {
  "$schema": "http://json-schema.org/draft-07/schema#",
  "title": "b1k-train chart values",
  "type": "object",
  "additionalProperties": False,
  "$defs": defs,
  "properties": {
    "nameOverride": s("string", "Replaces the chart name in object names", maxLength=40),
    "fullnameOverride": s("string", "Replaces the full object-name prefix", maxLength=40),
    "image": obj("Container image of every part", {
        "repository": s("string", "Image repository", minLength=1),
        "tag": s("string", "Image tag (empty: appVersion)"),
        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"], "description": "Image pull policy"}},
        ["repository", "pullPolicy"]),
    "imagePullSecrets": {"type": "array", "description": "Names of existing pull Secrets",
                         "items": {"$ref": "#/$defs/dnsName"}},
    "serviceAccount": obj("The pods' ServiceAccount", {
        "create": s("boolean", "Create it"), "name": s("string", "Its name (empty: full name)"),
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}, ["create"]),
    "rbac": obj("Namespaced read-only Role", {"create": s("boolean", "Create Role and RoleBinding")}, ["create"]),
    "podSecurityContext": obj("Pod security context; must run as non-root", {
        "runAsNonRoot": {"const": True, "description": "Pods never run as root"},
        "runAsUser": {"type": "integer", "minimum": 1}, "runAsGroup": {"type": "integer", "minimum": 1},
        "fsGroup": {"type": "integer", "minimum": 1},
        "seccompProfile": {"type": "object", "properties": {"type": {"enum": ["RuntimeDefault", "Localhost"]},
                                                             "localhostProfile": {"type": "string"}},
                           "required": ["type"], "additionalProperties": False}},
        ["runAsNonRoot", "runAsUser", "seccompProfile"]),
    "containerSecurityContext": obj("Container security context of every container", {
        "runAsNonRoot": {"const": True}, "allowPrivilegeEscalation": {"const": False},
        "readOnlyRootFilesystem": s("boolean", "Read-only root filesystem (writable emptyDirs are mounted)"),
        "privileged": {"const": False},
        "capabilities": {"type": "object", "additionalProperties": False,
                         "properties": {"drop": {"type": "array", "contains": {"const": "ALL"},
                                                 "items": {"type": "string"}},
                                        "add": {"type": "array", "maxItems": 0}}, "required": ["drop"]}},
        ["runAsNonRoot", "allowPrivilegeEscalation", "capabilities"]),
    "storage": obj("Run storage", {
        "url": s("string", "s3://bucket/prefix (or gs://, abfs:// with matching credentials)",
                 pattern="^[a-z0-9]+://[^\\s']+$"),
        "s3": obj("S3 settings", {
            "endpointUrl": s("string", "S3-compatible endpoint (empty: AWS)", pattern="^(https?://[^\\s]+)?$"),
            "region": s("string", "Bucket region", minLength=1),
            "credentialsSecret": obj("Existing Secret with the keys (empty name: pod identity)", {
                "name": s("string", "Secret name", pattern="^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
                "accessKeyIdKey": s("string", "Key of the access key id", minLength=1),
                "secretAccessKeyKey": s("string", "Key of the secret key", minLength=1)},
                ["name", "accessKeyIdKey", "secretAccessKeyKey"])}, ["region", "credentialsSecret"])},
        ["url", "s3"]),
    "mlflow": obj("MLflow tracking server", {
        "enabled": s("boolean", "Deploy the server"),
        "externalUri": s("string", "Tracking URI of your server when enabled=false",
                         pattern="^((https?|databricks)://?[^\\s]*)?$"),
        "tokenSecret": secret_ref("Secret with MLFLOW_TRACKING_TOKEN", "token"),
        "credentialsSecret": obj("Secret with the MLflow user and password (MLFLOW_TRACKING_USERNAME/PASSWORD)", {
            "name": s("string", "Secret name; empty for none", pattern="^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
            "usernameKey": s("string", "Key of the user name", minLength=1),
            "passwordKey": s("string", "Key of the password", minLength=1)}),
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "artifactsDestination": s("string", "Where the server stores artifacts", pattern="^[a-z0-9]+://[^\\s]+$"),
        "backendStore": obj("Run/registry database", {
            "databaseUriSecret": secret_ref("Secret holding a database URI", "uri"),
            "persistence": obj("SQLite volume", {
                "enabled": s("boolean", "Use a PersistentVolumeClaim"),
                "size": {"$ref": "#/$defs/quantity"}, "storageClassName": s("string", "StorageClass")},
                ["enabled", "size"])}, ["databaseUriSecret", "persistence"]),
        "allowedHosts": {"type": "array", "items": {"type": "string", "minLength": 1},
                         "description": "Extra accepted Host headers"},
        "workers": {"type": "integer", "minimum": 1, "maximum": 32},
        "resources": {"$ref": "#/$defs/resources"},
        "nodeSelector": {"$ref": "#/$defs/nodeSelector"}, "tolerations": {"$ref": "#/$defs/tolerations"}},
        ["enabled", "port", "resources", "artifactsDestination"]),
    "networkPolicy": obj("NetworkPolicies for the policy server and MLflow", {
        "enabled": s("boolean", "Create them"),
        "policyServerFrom": {"type": "array", "items": {"type": "object"},
                             "description": "NetworkPolicy peers allowed to reach the policy server"},
        "mlflowFrom": {"type": "array", "items": {"type": "object"},
                       "description": "Extra NetworkPolicy peers allowed to reach MLflow"}}, ["enabled"]),
    "training": obj("Training on KubeRay", {
        "enabled": s("boolean", "Render the training objects"),
        "mode": {"enum": ["rayjob", "raycluster"], "description": "RayJob, or a long-lived RayCluster"},
        "command": {"enum": ["fit", "pipeline"], "description": "b1k-train subcommand"},
        "recipe": s("string", "Recipe name", pattern="^[a-z0-9_]+$"),
        "runName": s("string", "Run name (a label value, so at most 63 characters)",
                     pattern="^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", maxLength=63),
        "jobName": s("string", "RayJob/RayCluster name (empty: <full name>-ray); DNS label, at most 44 characters "
                     "so KubeRay's generated cluster and pod names fit", pattern="^([a-z]([-a-z0-9]*[a-z0-9])?)?$",
                     maxLength=44),
        "overrides": {"type": "array", "description": "--set KEY=VALUE overrides",
                      "items": {"type": "string", "pattern": "^[a-z_][a-z0-9_.]*=[^']*$"}},
        "extraArgs": {"type": "array", "description": "More --flag=value arguments of the command",
                      "items": {"type": "string", "pattern": "^--[a-z][-a-z]*(=[^'\\s]*)?$"}},
        "trainWorkers": s("string", "N or MIN:MAX (empty: from the worker group)",
                          pattern="^([1-9][0-9]*(:[1-9][0-9]*)?)?$"),
        "rayVersion": s("string", "Ray version of the image", pattern="^[0-9]+\\.[0-9]+\\.[0-9]+$"),
        "rayAuth": {"enum": ["token", "disabled"], "description": "Ray token authentication"},
        "rayJob": obj("RayJob settings", {
            "backoffLimit": {"type": "integer", "minimum": 0, "maximum": 100},
            "shutdownAfterJobFinishes": s("boolean", "Delete the cluster after the job"),
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "suspend": s("boolean", "Create suspended (Kueue)"),
            "kueueQueue": s("string", "Kueue LocalQueue", pattern="^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"),
            "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
            "runtimeEnv": {"type": "object", "description": "Ray runtime_env"},
            "submitterResources": {"$ref": "#/$defs/resources"}},
            ["backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "suspend", "submitterResources"]),
        "head": obj("Ray head group", {
            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
            "resources": {"$ref": "#/$defs/resources"},
            "nodeSelector": {"$ref": "#/$defs/nodeSelector"}, "tolerations": {"$ref": "#/$defs/tolerations"}},
            ["resources"]),
        "workers": obj("Ray worker group", {
            "groupName": {"$ref": "#/$defs/dnsName"},
            "replicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 1},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "gpusPerWorker": {"type": "integer", "minimum": 0, "maximum": 16},
            "cpuTrainWorkersPerPod": {"type": "integer", "minimum": 1},
            "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
            "resources": {"$ref": "#/$defs/resources"},
            "nodeSelector": {"$ref": "#/$defs/nodeSelector"}, "tolerations": {"$ref": "#/$defs/tolerations"}},
            ["groupName", "replicas", "minReplicas", "maxReplicas", "gpusPerWorker", "resources"]),
        "shmSize": {"$ref": "#/$defs/quantity"}, "scratchSize": {"$ref": "#/$defs/quantity"},
        "nccl": obj("NCCL settings of GPU workers", {
            "debug": {"enum": ["VERSION", "WARN", "INFO", "TRACE"]},
            "socketIfname": s("string", "Interface(s) NCCL bootstraps over", minLength=1),
            "ibDisable": s("boolean", "Disable InfiniBand"),
            "extraEnv": {"type": "object", "description": "NCCL_* variables only",
                         "patternProperties": {"^NCCL_[A-Z0-9_]+$": {"type": ["string", "integer", "boolean"]}},
                         "additionalProperties": False}},
            ["debug", "socketIfname", "ibDisable"]),
        "env": {"type": "array", "items": {"$ref": "#/$defs/envVar"}}},
        ["enabled", "mode", "command", "recipe", "runName", "rayJob", "head", "workers"]),
    "serving": obj("Policy server", {
        "enabled": s("boolean", "Deploy it"),
        "model": s("string", "models:/NAME@ALIAS, s3:// export or mapping file",
                   pattern="^(models:/[A-Za-z0-9_.-]+(@[A-Za-z0-9_-]+|/[0-9]+)|[a-z0-9]+://\\S+)$"),
        "replicas": {"type": "integer", "minimum": 1},
        "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "device": {"enum": ["cuda", "cpu"]},
        "gpus": {"type": "integer", "minimum": 0, "maximum": 8},
        "memoryBudgetGb": {"type": "number", "exclusiveMinimum": 0},
        "overrides": {"type": "array", "items": {"type": "string", "pattern": "^[a-z_][a-z0-9_.]*=\\S*$"}},
        "apiKeysSecret": secret_ref("Secret holding the accepted API keys, one per line", "api-keys"),
        "tlsSecret": s("string", "kubernetes.io/tls Secret for wss://", pattern="^([a-z0-9]([-.a-z0-9]*[a-z0-9])?)?$"),
        "maxMessageMb": {"type": "number", "exclusiveMinimum": 3.74,
                         "description": "Message cap in MiB; above 3.74 so 720/480 observations pass"},
        "maxConnections": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0, "description": "0 = off (the default)"},
        "resources": {"$ref": "#/$defs/resources"},
        "modelCacheSize": {"$ref": "#/$defs/quantity"},
        "startupTimeoutSeconds": {"type": "integer", "minimum": 10},
        "nodeSelector": {"$ref": "#/$defs/nodeSelector"}, "tolerations": {"$ref": "#/$defs/tolerations"},
        "podDisruptionBudget": obj("PodDisruptionBudget", {
            "enabled": s("boolean", "Create it"), "minAvailable": {"type": "integer", "minimum": 0}},
            ["enabled", "minAvailable"]),
        "autoscaling": obj("HorizontalPodAutoscaler", {
            "enabled": s("boolean", "Create it"), "minReplicas": {"type": "integer", "minimum": 1},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100}},
            ["enabled", "minReplicas", "maxReplicas", "targetCPUUtilizationPercentage"])},
        ["enabled", "model", "replicas", "port", "device", "gpus", "resources"]),
  },
  "required": ["image", "serviceAccount", "podSecurityContext", "containerSecurityContext", "storage", "mlflow",
               "training", "serving"],
}
# Cross-field rules the type checks cannot express.
schema["allOf"] = [
  {"description": "mlflow.externalUri is required when mlflow.enabled is false",
   "if": {"properties": {"mlflow": {"properties": {"enabled": {"const": False}}}}},
   "then": {"properties": {"mlflow": {"required": ["externalUri"], "properties": {"externalUri": {"minLength": 1}}}}}},
  {"description": "a GPU server needs gpus >= 1",
   "if": {"properties": {"serving": {"properties": {"device": {"const": "cuda"}, "enabled": {"const": True}}}}},
   "then": {"properties": {"serving": {"properties": {"gpus": {"minimum": 1}}}}}},
]


def render() -> str:
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
