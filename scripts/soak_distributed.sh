#!/usr/bin/env bash
# Runs tests/distributed N times in a row and counts the runs that failed and those in which a
# process aborted in the C++ runtime ("terminate called", SIGABRT, a fatal Python error), so an
# intermittent teardown crash is measured instead of hidden.
#
# Usage: scripts/soak_distributed.sh N [pytest arguments]
# Environment: PYTHON (default .venv/bin/python, else python3), LOGDIR (default a new temporary
# folder: the log of every failed run is kept there).
# Exits 1 if any run failed.
set -u
if [ $# -lt 1 ] || ! [ "$1" -ge 1 ] 2>/dev/null; then
    echo "usage: scripts/soak_distributed.sh N [pytest arguments]  (N >= 1 runs)" >&2
    exit 2
fi
runs=$1
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOGDIR=${LOGDIR:-$(mktemp -d -t torchsage-soak.XXXXXX)}
mkdir -p "$LOGDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
failures=0
aborts=0
for i in $(seq 1 "$runs"); do
    log="$LOGDIR/run$i.log"
    "$PYTHON" -m pytest -q tests/distributed "$@" >"$log" 2>&1
    rc=$?
    aborted=0
    if grep -qE "terminate called|SIGABRT|Fatal Python error|core dumped" "$log"; then
        aborted=1
        aborts=$((aborts + 1))
    fi
    if [ "$rc" -ne 0 ]; then
        failures=$((failures + 1))
    elif [ "$aborted" -eq 0 ]; then
        rm -f "$log"
    fi
    echo "run $i/$runs: rc=$rc aborted=$aborted (failures $failures, aborts $aborts)"
done
echo "soak: $runs runs of tests/distributed, $failures failed, $aborts with an abort (logs: $LOGDIR)"
[ "$failures" -eq 0 ]
