#!/usr/bin/env bash
# Runs the legacy server's own tests against mcp_redis.compat, on Redis and in
# local mode (each test twice). Nothing of the legacy server is kept in this repository (its
# code stays out of our commits): give a checkout of CIRWEL/unitares.
#   bash scripts/legacy_acceptance.sh /path/to/unitares [TEST_FILE ...]
# Default files: tests/test_rate_limiter.py tests/test_state_locking.py (those present).
# Expected failures (tests of the legacy classes' private state) are listed
# in docs/migration.md.
set -uo pipefail
cd "$(dirname "$0")/.."
checkout="${1:?usage: $0 /path/to/unitares [TEST_FILE ...]}"; shift
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  for f in tests/test_rate_limiter.py tests/test_state_locking.py; do
    [ -f "$checkout/$f" ] && files+=("$f")
  done
fi
python="${PYTHON:-.venv/bin/python}"
# Each test runs on local and on redis (tests/legacy/plugin.py); expected
# failures are strict xfails there.
paths=()
for f in "${files[@]}"; do paths+=("$checkout/$f"); done
"$python" -m pytest -p no:cacheprovider -q -rx --rootdir "$PWD" -p tests.conftest -p tests.legacy.plugin "${paths[@]}"
