#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the main job on the embedded default
# (local files, local processes): b1k-train demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
exec "$root/.venv/bin/b1k-train" demo --workdir "${B1K_DEMO_DIR:-$root/outputs/demo}" "$@"
