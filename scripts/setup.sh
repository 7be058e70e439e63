#!/usr/bin/env bash
# Creates .venv and installs b1k-train with its dev extra. Idempotent: a re-run with an unchanged
# pyproject.toml does nothing. torch is installed first, pinned, so that nothing later pulls another build.
# A fresh install takes about 10 minutes on 2 cores, most of it pip resolving b1k-train[dev]: every step prints
# its elapsed time, and a heartbeat (every B1K_SETUP_HEARTBEAT_S, default 20 s) says how many packages pip has
# collected so far and which one it is on, so a long resolve is never silent.
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
heartbeat="${B1K_SETUP_HEARTBEAT_S:-20}"
t_start=$SECONDS

say() {  # one line, prefixed with the time since setup started
  local s=$((SECONDS - t_start))
  printf '[setup %dm%02ds] %s\n' $((s / 60)) $((s % 60)) "$*"
}

distinct_collected() {  # packages pip has collected so far (it repeats "Collecting X" while backtracking)
  { grep '^Collecting ' "$1" || true; } | cut -d' ' -f2 | sed 's/[][<>=!~(;].*//' | sort -u | wc -l
}

# pip_step LABEL PIP-ARGS...: `pip install` in the background (its full log kept for a failure), reporting
# each phase and a heartbeat instead of pip's quiet silence.
pip_step() {
  local label="$1"; shift
  local log; log="$(mktemp "${TMPDIR:-/tmp}/b1k-setup-pip.XXXXXX")"
  local t0=$SECONDS last=$SECONDS rc=0 installing="" said=0
  say "installing $label"
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [[ -z "$installing" ]] && grep -q '^Installing collected packages' "$log"; then
      installing=1
      say "  $label: resolved in $((SECONDS - t0)) s; installing $(distinct_collected "$log") packages"
      last=$SECONDS
    fi
    # pip's own notes on a long resolve ("pip is looking at multiple versions of X"), each once
    local notes
    notes="$(grep '^INFO: pip is' "$log" || true)"
    if [[ -n "$notes" ]] && (( $(wc -l <<<"$notes") > said )); then
      tail -n +$((said + 1)) <<<"$notes" | cut -c1-110 | while read -r note; do say "  $label: ${note#INFO: }"; done
      said=$(wc -l <<<"$notes")
    fi
    if (( SECONDS - last >= heartbeat )); then
      local n current
      n="$(distinct_collected "$log")"
      current="$(grep -E '^ *(Collecting|Downloading|Using cached|Building|Installing)' "$log" | tail -n 1 \
                 | sed 's/^ *//' | cut -c1-100 || true)"
      say "  $label: $((SECONDS - t0)) s, $n packages collected${current:+ (now: $current)}"
      last=$SECONDS
    fi
  done
  wait "$pid" || rc=$?
  if (( rc != 0 )); then
    say "pip failed installing $label (exit $rc); the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
    return "$rc"
  fi
  say "  $label: done in $((SECONDS - t0)) s"
  rm -f "$log"
}

say "creating $venv with $($PY --version)"
[[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
pip_step "torch==2.13.0 (the CPU wheel here; the CUDA build on a GPU host)" "torch==2.13.0" "setuptools>=68" wheel
# deepspeed ships only an sdist whose setup.py imports torch: build it against the torch just installed
# (an isolated build environment would download a second, multi-GB torch).
pip_step "deepspeed==0.19.8 (built against that torch, no build isolation)" --no-build-isolation "deepspeed==0.19.8"
pip_step "b1k-train[dev] (ray, mlflow, s3fs, moto, ... from pyproject.toml)" -e ".[dev]"
"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, got {torch.__version__}"
PY
echo "$want" > "$stamp"
say "done"
