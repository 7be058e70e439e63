#!/usr/bin/env bash
# Creates .venv and installs b1k-train with its dev extra. Idempotent: a re-run with an unchanged
# pyproject.toml does nothing. torch is installed first, pinned, so that nothing later pulls another build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/env.sh
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
venv="$root/.venv"
stamp="$venv/.b1k-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] creating $venv with $($PY --version)"
[[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
pip() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
echo "[setup] installing torch==2.13.0"
pip "torch==2.13.0" "setuptools>=68" wheel
# deepspeed ships only an sdist whose setup.py imports torch: build it against the torch just installed
# (an isolated build environment would download a second, multi-GB torch).
echo "[setup] installing deepspeed==0.19.8 (no build isolation)"
pip --no-build-isolation "deepspeed==0.19.8"
echo "[setup] installing b1k-train[dev]"
pip -e ".[dev]"
"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, got {torch.__version__}"
PY
echo "$want" > "$stamp"
echo "[setup] done"
