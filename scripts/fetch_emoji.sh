#!/usr/bin/env bash
# Fetch the offline emoji image–caption set through npm (the only network use): Google's 64×64 emoji images from
# emoji-datasource-google@16.0.0 (Apache-2.0) and CLDR annotations + tags from openmoji@17.0.0 data/openmoji.csv
# (MIT).  Each package is unpacked into its own folder under DEST (default data_cache/emoji, gitignored), keeping
# only what dual_emc2.data.offline_sets.read_emoji reads and the licence files.
# Usage: bash scripts/fetch_emoji.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-data_cache/emoji}
GOOGLE=emoji-datasource-google@16.0.0
OPENMOJI=openmoji@17.0.0

if [ -f "$DEST/emoji-datasource-google/package/emoji.json" ] \
   && [ -d "$DEST/emoji-datasource-google/package/img/google/64" ] \
   && [ -f "$DEST/openmoji/package/data/openmoji.csv" ]; then
  echo "[fetch_emoji] already present in $DEST"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "[fetch_emoji] npm is required (apt-get install -y npm)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$GOOGLE" "$OPENMOJI" >/dev/null)
mkdir -p "$DEST/emoji-datasource-google" "$DEST/openmoji"
tar -xzf "$tmp"/emoji-datasource-google-*.tgz -C "$DEST/emoji-datasource-google" \
  package/emoji.json package/LICENSE package/package.json package/img/google/64
tar -xzf "$tmp"/openmoji-*.tgz -C "$DEST/openmoji" \
  package/data/openmoji.csv package/LICENSE.txt package/package.json
echo "[fetch_emoji] $(ls "$DEST/emoji-datasource-google/package/img/google/64" | wc -l) images and" \
  "$(($(wc -l < "$DEST/openmoji/package/data/openmoji.csv") - 1)) annotations in $DEST"
