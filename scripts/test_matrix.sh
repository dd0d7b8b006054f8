#!/usr/bin/env bash
# Runs the whole test suite once per CPU kernel set and intra-op thread count, so a tolerance that
# holds on one machine only shows up here: ATEN_CPU_CAPABILITY picks the kernels another CPU would
# run (default: no vector instructions; avx2), TORCHSAGE_TEST_THREADS the thread count the tests
# run with (tests/conftest.py reads it; 1 by default).
#
# Usage: scripts/test_matrix.sh [pytest arguments]   (e.g. tests/optim to run a subset)
# Environment: CAPABILITIES (default "default avx2"), THREADS (default "1 2"), PYTHON (default
# .venv/bin/python, else python3), LOGDIR (default a new temporary folder).
# Prints one line per configuration and exits 1 if any configuration failed.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
CAPABILITIES=${CAPABILITIES:-"default avx2"}
THREADS=${THREADS:-"1 2"}
LOGDIR=${LOGDIR:-$(mktemp -d -t torchsage-matrix.XXXXXX)}
mkdir -p "$LOGDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
for capability in $CAPABILITIES; do
    for threads in $THREADS; do
        log="$LOGDIR/pytest-$capability-threads$threads.log"
        start=$(date +%s)
        ATEN_CPU_CAPABILITY=$capability TORCHSAGE_TEST_THREADS=$threads \
            "$PYTHON" -m pytest -q "$@" >"$log" 2>&1
        rc=$?
        summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)" "$log" | tail -n 1 | tr -d '=')
        printf '%-8s threads=%s  rc=%s  %s  (%ss, log %s)\n' \
            "$capability" "$threads" "$rc" "${summary:-no summary}" "$(($(date +%s) - start))" "$log"
        [ "$rc" -eq 0 ] || status=1
    done
done
exit $status
