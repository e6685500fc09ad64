#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh, and Chromium for the browser tests), then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install-system-deps.sh --browser  # headless Chromium for the browser tests
exec .venv/bin/python -m pytest -q "$@"
