#!/usr/bin/env bash
# Install the pinned Node relay packages (see package.json) if node_modules is missing.
# Same logic as ensure_node_deps() in benchmarks/anchors.py; exits 0 when ready.
set -euo pipefail
cd "$(dirname "$0")"
command -v node >/dev/null || { echo "ensure.sh: node not found" >&2; exit 1; }
command -v npm >/dev/null || { echo "ensure.sh: npm not found" >&2; exit 1; }
if [ ! -f node_modules/@y/websocket-server/package.json ]; then
  npm ci --no-audit --no-fund --ignore-scripts
fi
