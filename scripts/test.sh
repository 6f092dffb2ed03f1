#!/usr/bin/env bash
# Install the package with its test extra into .venv (if needed), then run ruff and the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k metrics -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv test
export HF_HUB_OFFLINE=1
# The search page's browser test drives Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo > /dev/null && sudo="sudo -n"
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
        echo ">> installing chromium + chromium-driver (apt-get) for the browser test"
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver > /dev/null 2>&1 \
            || { $sudo apt-get update -qq > /dev/null && \
                 $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver > /dev/null; } \
            || echo ">> could not install chromium; the browser test will say so"
    else
        echo ">> chromium missing and no root: the browser test will skip (fail under CI=true)"
    fi
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
