#!/usr/bin/env bash
# Install the package with its test extras into .venv and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,dev,prometheus,mcp]'
.venv/bin/python -m pytest -p no:cacheprovider "$@"
