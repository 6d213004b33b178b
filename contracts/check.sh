#!/usr/bin/env bash
# Reinstalls the pinned solc-js, recompiles the contracts and fails if the committed
# artifacts in contracts/out differ from what the sources compile to.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
node build.mjs
if ! git diff --exit-code -- out; then
  echo "contracts/out is stale: run 'node contracts/build.mjs' and commit contracts/out" >&2
  exit 1
fi
if [ -n "$(git status --porcelain -- out)" ]; then
  git status --porcelain -- out >&2
  echo "contracts/out has uncommitted artifacts: run 'node contracts/build.mjs' and commit contracts/out" >&2
  exit 1
fi
echo "contracts: artifacts up to date"
