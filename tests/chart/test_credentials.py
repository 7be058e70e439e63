"""The chart refuses literal credentials wherever it renders values in plain text (the RayJob's runtimeEnvYAML and
entrypoint, which Ray echoes into job logs, and container env): the render fails naming the key and pointing to a
Secret (secretKeyRef), never printing the value. Credentials from a Secret still work."""

from __future__ import annotations

import pytest

from tests.chart.support import objects, pod_specs, render

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret access key
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"


def _refused(values: dict, *where: str) -> str:
    from helm_python import HelmRenderError

    with pytest.raises(HelmRenderError) as e:
        render(values)
    message = str(e.value)
    for part in where:
        assert part in message, message
    assert "Secret" in message, message
    assert AWS_SECRET not in message and "hunter2" not in message, "the message must not echo the credential"
    return message


def test_runtime_env_var_with_a_secret_name_is_refused():
    message = _refused({"training": {"rayJob": {"runtimeEnv": {"env_vars": {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}}}}},
                       "training.rayJob.runtimeEnv.env_vars.AWS_SECRET_ACCESS_KEY", "secretKeyRef")
    assert "training.env" in message


@pytest.mark.parametrize("env_vars,where", [
    ({"HF_TOKEN": "hunter2"}, "env_vars.HF_TOKEN"),
    ({"WANDB_API_KEY": "hunter2"}, "env_vars.WANDB_API_KEY"),
    ({"DB_PASSWORD": "hunter2"}, "env_vars.DB_PASSWORD"),
    ({"SOME_SETTING": AWS_KEY_ID}, "env_vars.SOME_SETTING looks like a key"),  # the value's shape, whatever the name
    ({"OTHER": AWS_SECRET}, "env_vars.OTHER looks like a key"),
    ({"MLFLOW_TRACKING_URI": "https://bob:hunter2@mlflow.lab"}, "env_vars.MLFLOW_TRACKING_URI is a URI with user"),
])
def test_runtime_env_credential_shapes_are_refused(env_vars, where):
    _refused({"training": {"rayJob": {"runtimeEnv": {"env_vars": env_vars}}}}, where)


def test_override_with_a_credential_is_refused():
    _refused({"training": {"overrides": ["num_steps=10", "tracking.password=hunter2"]}},
             "training.overrides[1] (tracking.password)", "secretKeyRef")
    _refused({"training": {"overrides": ["tracking_uri=http://bob:hunter2@mlflow:5000"]}},
             "training.overrides[0] (tracking_uri) is a URI with user information")


def test_extra_arg_with_a_credential_is_refused():
    _refused({"training": {"extraArgs": ["--experiment=x", f"--api-key={AWS_SECRET}"]}},
             "training.extraArgs[1] (api-key)", "secretKeyRef")


def test_tracking_uri_with_user_information_is_refused():
    _refused({"mlflow": {"enabled": False, "externalUri": "https://bob:hunter2@mlflow.lab"}},
             "mlflow.externalUri is a URI with user information", "mlflow.credentialsSecret")


def test_literal_training_env_value_shaped_like_a_key_is_refused():
    # Secret-named literals are already rejected by values.schema.json; a key-shaped value under a neutral name is
    # caught by the render.
    _refused({"training": {"env": [{"name": "S3_LOGIN", "value": AWS_KEY_ID}]}},
             "training.env[0] (S3_LOGIN) looks like a key", "valueFrom.secretKeyRef")


def test_serving_override_and_storage_url_with_credentials_are_refused():
    _refused({"serving": {"overrides": ["api_keys=hunter2"]}}, "serving.overrides[0] (api_keys)")
    _refused({"storage": {"s3": {"endpointUrl": "http://minio:hunter2@minio:9000"}}}, "storage.s3.endpointUrl")


def test_harmless_values_with_secret_like_words_still_render():
    values = {"training": {
        "overrides": ["model.max_fast_tokens=256", "data.fast_tokenizer=s3://b/tok", "num_steps=10"],
        "extraArgs": ["--experiment=key-study"],
        "rayJob": {"runtimeEnv": {"env_vars": {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TOKENIZERS_PARALLELISM": "false",
                                               "GIT_SHA": "3adf61e0f1c2b3a4d5e6f708192a3b4c5d6e7f80"}}}}}
    assert objects(render(values))


def test_credentials_from_secrets_reach_every_ray_container():
    hf_token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    values = {"training": {"env": [hf_token]},
              "mlflow": {"enabled": False, "externalUri": "https://mlflow.lab",
                         "credentialsSecret": {"name": "mlflow-basic"}}}
    job = next(o for o in objects(render(values)) if o["kind"] == "RayJob")
    ray_pods = [(w, p) for w, p in pod_specs(job) if not w.endswith("submitter")]
    assert len(ray_pods) == 2
    for where, pod in ray_pods:
        env = {e["name"]: e.get("valueFrom") for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}, where
        assert env["MLFLOW_TRACKING_USERNAME"] == {"secretKeyRef": {"name": "mlflow-basic", "key": "username"}}
        assert env["MLFLOW_TRACKING_PASSWORD"] == {"secretKeyRef": {"name": "mlflow-basic", "key": "password"}}
