#!/usr/bin/env bash
# Set up everything: a Python 3.11 virtual environment with the pinned requirements, linked at .venv.
# Environments are kept per requirements hash under ${MEDSAM3_ENV_CACHE:-~/.cache/medsam3}, so re-running
# (or CI on a fresh clone) reuses a matching one and builds it only when requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "medsam3 needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

hash=$(sha256sum requirements.txt | cut -c1-16)
cache="${MEDSAM3_ENV_CACHE:-$HOME/.cache/medsam3}"
env_dir="$cache/venv-$hash"
if [ ! -f "$env_dir/.complete" ]; then
  echo "Building environment $env_dir (about 10 minutes)"
  rm -rf "$env_dir"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$env_dir"
  "$env_dir/bin/python" -m pip install --quiet -r requirements.txt
  "$env_dir/bin/python" -m pip check
  touch "$env_dir/.complete"
fi
if [ -e .venv ] && [ ! -L .venv ]; then
  rm -rf .venv  # an environment from an older set-up
fi
ln -sfn "$env_dir" .venv
# The bundle's code is the package `scripts` (as MONAI bundles name it): make it importable from anywhere, so
# `python -m monai.bundle run --config_file bundle/configs/...` works from the repository root.
site=$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(pwd)/bundle" > "$site/medsam3_bundle.pth"
echo "Environment ready ($env_dir): source .venv/bin/activate"
