#!/usr/bin/env bash
# Refresh the vendored Apache ECharts from npm (see README.md beside this script).
#   mlx_engine/server/ui/vendor/refresh.sh [VERSION]     # default: the version pinned below
# It installs the exact version into a temporary folder, copies the one built file the viewer
# imports and the licence files, and prints the sha256 to write into README.md.
set -euo pipefail
VERSION="${1:-6.1.0}"
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm init -y >/dev/null
npm install --no-audit --no-fund --save-exact "echarts@$VERSION" >/dev/null
SRC="$WORK/node_modules/echarts"
DST="$HERE/echarts"
mkdir -p "$DST"
cp "$SRC/dist/echarts.esm.min.mjs" "$SRC/LICENSE" "$SRC/NOTICE" "$DST/"
cp "$SRC/licenses/LICENSE-d3" "$DST/LICENSE-d3"
echo "echarts $(node -p "require('$SRC/package.json').version")"
sha256sum "$DST/echarts.esm.min.mjs"
