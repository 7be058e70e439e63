#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
source scripts/env.sh
set +e
"$root/.venv/bin/python" -m pytest tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "ERROR: pytest collected no tests (exit 5); the suite must not pass empty." >&2
fi
exit $rc
