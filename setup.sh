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

# The PACS and browser tests use the real parts (Debian packages): Orthanc with DICOMweb, Chromium and its driver,
# and dicom3tools' DICOM validator for the phantom's files.
debs=(orthanc orthanc-dicomweb chromium chromium-driver dicom3tools)
missing=()
for deb in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]} (Debian packages for the PACS and browser tests)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "Not installing ${missing[*]} (needs root and apt-get): the PACS and browser tests will be skipped" >&2
  fi
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
# `python -m monai.bundle run --config_file bundle/configs/...` works from the repository root. Checkouts share the
# environment, so the path is not fixed: run as <checkout>/.venv/bin/python, sys.prefix is that checkout's .venv
# and its own bundle is imported; the checkout set up last serves an activated shell (sys.prefix the shared one).
site=$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own="os.path.join(os.path.dirname(sys.prefix), 'bundle')"
printf '%s\n' "import os, sys; sys.path.append($own if os.path.isdir(os.path.join($own, 'scripts')) else '$(pwd)/bundle')" \
  > "$site/medsam3_bundle.pth"
echo "Environment ready ($env_dir): source .venv/bin/activate"
