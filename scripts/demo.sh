#!/usr/bin/env bash
# Install the package into .venv and run the demo: several worker processes
# sharing sessions, locks, rate limits, caches and events through Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[prometheus]'
exec .venv/bin/mcp-redis demo "$@"
