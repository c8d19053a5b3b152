#!/usr/bin/env bash
# Shared by run.sh and test.sh: create .venv if missing and install kdsim into it.
# Re-installs only when pyproject.toml (or KDSIM_EXTRAS) changed since the last install.
#   KDSIM_PYTHON  interpreter used to create .venv (default: python3, needs >= 3.10)
#   KDSIM_EXTRAS  extra install extras, comma separated, e.g. "cuda" for NVIDIA GPUs
# Always installed: "test" (pytest) and "data" (the built-in pools of task.name = "pool").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${KDSIM_PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "kdsim: '$py' not found; install Python >= 3.10 or set KDSIM_PYTHON" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
    echo "kdsim: Python >= 3.10 is required ($("$py" --version 2>&1) found)" >&2; exit 1; }
  echo "kdsim: creating .venv with $("$py" --version 2>&1)"
  "$py" -m venv .venv
fi
extras="test,data${KDSIM_EXTRAS:+,$KDSIM_EXTRAS}"
stamp=".venv/.kdsim-install-$(cat pyproject.toml | cksum | cut -d' ' -f1)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "kdsim: installing kdsim[$extras] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  rm -f .venv/.kdsim-install-*
  touch "$stamp"
fi
