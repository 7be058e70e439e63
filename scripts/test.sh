#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the whole test suite, or only what the arguments name:
#   bash scripts/test.sh                       # pytest tests (what .ci/run does)
#   bash scripts/test.sh tests/unit -q -x      # the arguments replace the default `tests`
set -euo pipefail
caller="$PWD"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
set +e
if [[ $# -gt 0 ]]; then
  # pytest's own arguments, read from where the command was typed
  (cd "$caller" && "$root/.venv/bin/python" -m pytest "$@")
else
  "$root/.venv/bin/python" -m pytest tests
fi
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "ERROR: pytest collected no tests (exit 5); the suite must not pass empty." >&2
fi
exit $rc
