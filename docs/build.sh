#!/usr/bin/env bash
# Builds the documentation site into OUTPUT_DIR (HTML; open OUTPUT_DIR/index.html).
# Offline; every warning, broken cross-reference included, fails the build.
#   usage: bash docs/build.sh OUTPUT_DIR
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: bash docs/build.sh OUTPUT_DIR" >&2
    exit 2
fi
docs="$(cd "$(dirname "$0")" && pwd)"
output="$1"
doctrees="$(mktemp -d)"
trap 'rm -rf "$doctrees"' EXIT
# -E: read every source again (the API pages are generated from the package at each build)
python -m sphinx -b html -W --keep-going -n -E -q -d "$doctrees" "$docs" "$output"
echo "documentation built: $output/index.html"
