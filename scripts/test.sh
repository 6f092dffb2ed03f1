#!/usr/bin/env bash
# Install the package with its test extra into .venv (if needed), then run ruff and the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k metrics -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv test
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
