#!/usr/bin/env bash
# The accelerator check (issue 16): engine throughput against BlackJAX and the minimal
# kernels, the default and a 256-dataset simulate with their stage breakdowns, float32
# against float64. Results in benchmarks/results/device_check_<platform>.{json,md}.
#
#   bash benchmarks/device_check.sh          # on one GPU: under 5 minutes
#   bash benchmarks/device_check.sh --cpu    # tiny sizes on the CPU (tests/test_benchmarks_device_check.py)
#
# On a machine without network access, dependencies missing there (e.g. blackjax, flax,
# optax) can travel as wheels in .whl/ (they are installed into /tmp/site first).
# PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_check.py "$@"
