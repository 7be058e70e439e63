# Environment shared by scripts/demo.sh and scripts/test.sh.
# Keep every tool off the network: no usage reporting, no cloud metadata probing, no model hub.
export RAY_USAGE_STATS_ENABLED=0
# Ray's single-machine mode: nodes live on 127.0.0.1 instead of the LAN address it would pick otherwise.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export AWS_EC2_METADATA_DISABLED=true
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
