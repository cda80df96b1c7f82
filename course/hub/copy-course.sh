#!/usr/bin/env bash
# Copy the course (sources, release, autograder, llmopt, nbgrader config) into DEST, owned
# by USER: an instructor's course root on the hub.  Usage: copy-course.sh DEST USER
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=$1; owner=$2
mkdir -p "$dest"
for d in solutions labs autograder lib course; do
  rm -rf "${dest:?}/$d"
  cp -r "$REPO/$d" "$dest/$d"
done
cp "$REPO/pyproject.toml" "$dest/"
rm -rf "$dest/course/hub"
find "$dest" \( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +
chown -R "$owner:" "$dest"
chmod 700 "$dest"
