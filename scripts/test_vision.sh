#!/usr/bin/env bash
# Runs the tests marked `torchvision` against the real torchvision, in a venv of their own
# (.venv-vision), never in `make test`'s .venv: PyPI's torchvision needs the torch release it was
# built for, and those wheels are the CUDA builds (about 5.5 GB installed; they run on a CPU too).
#
# Usage: scripts/test_vision.sh [pytest arguments]   (`make test-vision` calls it)
# Environment: PYTHON (default python3, 3.11 or newer), VISION_VENV (default .venv-vision),
# VISION_TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1", the pair tested; a pair of
# another release works the same way).
# The venv is built once (stamp file); it is rebuilt when pyproject.toml or this script changes.
# TORCHSAGE_REQUIRE_TORCHVISION=1 makes a torchvision that does not import fail the run, not skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VISION_VENV:-.venv-vision}
SPEC=${VISION_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
STAMP="$VENV/.installed"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ] \
    || [ "$(cat "$STAMP")" != "$SPEC" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch and torchvision first, as a pair; torchsage's extras must not move them
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet $SPEC
    before=$("$VENV/bin/python" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)")
    "$VENV/bin/python" -m pip install --quiet -e ".[dev,vision]"
    after=$("$VENV/bin/python" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)")
    if [ "$before" != "$after" ]; then
        echo "test_vision: installing torchsage changed torch/torchvision from $before to $after" >&2
        exit 1
    fi
    echo "$SPEC" >"$STAMP"
fi

"$VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TORCHSAGE_REQUIRE_TORCHVISION=1 exec "$VENV/bin/python" -m pytest -q -m torchvision "$@"
