#!/usr/bin/env bash
# Set up .venv if needed and run the test suite. Extra arguments go to pytest.
set -euo pipefail
# The Ray extra is installed so the distributed-sweep tests really run.
export KDSIM_EXTRAS="ray${KDSIM_EXTRAS:+,$KDSIM_EXTRAS}"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Two workers: compilation is single-threaded, so they use both cores of a small machine.
# Long tests marked `slow` (each covered by a faster one) run with: scripts/test.sh -m slow
exec .venv/bin/python -m pytest -q -n "${KDSIM_TEST_WORKERS:-2}" --dist loadfile -m "${KDSIM_TEST_MARKS:-not slow}" "$@"
