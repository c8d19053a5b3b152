#!/usr/bin/env bash
# Set up .venv if needed, run the default simulation, print its summary, write its plot.
# Extra arguments go to `kdsim run`, e.g. scripts/run.sh configs/linear_rank.toml --out runs/rank
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -eq 0 ]; then
  set -- --out runs/default
fi
exec .venv/bin/kdsim run "$@"
