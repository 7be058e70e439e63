#!/usr/bin/env bash
# Audits every installed dependency version (pip freeze of .venv) for known vulnerabilities with pip-audit,
# run from its own venv so that its dependencies do not enter ours. --strict: a package that could not be audited
# fails the audit (a silent "no known vulnerabilities" for unaudited packages is worse than a failure).
# Accepted findings: .ci/audit-allowlist.txt, one "VULN-ID  package  reason (reviewer, date)" per line.
#
#   bash scripts/audit.sh            # needs https://pypi.org/pypi/<name>/<version>/json or api.osv.dev
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
tools="$root/.venv-audit"
[[ -x "$tools/bin/pip-audit" ]] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "pip-audit==2.10.0"; }
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$root/.venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check > "$reqs"
ignores=()
while read -r id _; do
  [[ -z "$id" || "$id" == \#* ]] && continue
  ignores+=(--ignore-vuln "$id")
done < .ci/audit-allowlist.txt
exec "$tools/bin/pip-audit" --strict --no-deps --disable-pip --progress-spinner off -r "$reqs" \
  --vulnerability-service "${B1K_AUDIT_SERVICE:-pypi}" "${ignores[@]}"
