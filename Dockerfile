# b1k-train image: training (Ray Train workers, the `ray job submit` driver) and the policy server.
#
# Dependencies come only from pyproject.toml, installed in the same order as scripts/setup.sh: torch first
# (pinned; on Linux x86_64 the PyPI wheel is the CUDA build, so the image runs on GPU nodes with the host's NVIDIA
# driver and on CPU nodes alike), then DeepSpeed built against it, then the project. No second dependency list.
#
#   docker build -t b1k-train .
#   docker run --gpus all b1k-train fit pi_behavior_b1k --run-name r --storage s3://bucket/runs --workers 8
#   docker run -p 8000:8000 -e B1K_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz b1k-train \
#       serve --model models:/pi-behavior-ckpt1@champion --host 0.0.0.0
FROM python:3.11-slim-bookworm

# build-essential: DeepSpeed compiles its ops just in time; git: `b1k.git_commit` tags fall back to it;
# wget: KubeRay's default readiness/liveness probes of Ray head and worker pods run `wget` against the raylet.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git wget \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1

WORKDIR /opt/b1k-train
COPY pyproject.toml README.md ./
COPY trainer trainer
COPY data_loaders data_loaders
COPY models models
COPY checkpoints checkpoints
COPY serving serving
# The Helm chart: `b1k-train k8s submit` and `pipeline --on-k8s` render their RayJobs from it.
COPY helm/b1k-train helm/b1k-train
RUN pip install "torch==2.13.0" "setuptools>=68" wheel \
    && pip install --no-build-isolation "deepspeed==0.19.8" \
    && pip install . \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# A non-root user; its home holds the model cache (B1K_MODEL_CACHE) and Ray's session files.
RUN useradd --create-home --uid 1000 b1k
USER 1000:1000
ENV HOME=/home/b1k B1K_MODEL_CACHE=/home/b1k/.cache/b1k-train/models B1K_CHART_DIR=/opt/b1k-train/helm/b1k-train
WORKDIR /home/b1k

# Healthy when B1K_HEALTHCHECK_URL (e.g. the server's /healthz) answers 2xx; always healthy when it is unset
# (training containers). Kubernetes uses its own probes on /healthz instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 CMD python -c "import os, sys, \
urllib.request; u = os.environ.get('B1K_HEALTHCHECK_URL'); sys.exit(0 if not u else \
0 if urllib.request.urlopen(u, timeout=2).status < 300 else 1)"

EXPOSE 8000
ENTRYPOINT ["b1k-train"]
CMD ["--help"]
