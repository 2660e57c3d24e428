#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install adyolo into it.
#
#   bash launch/setup_env.sh            # then use .venv/bin/python, .venv/bin/accelerate
#
# torch and torchvision go in first, as a matched pair, with `pip --isolated`: some machines' pip
# config points at a local CPU-only torch wheel that the index's torchvision cannot load.
# Re-running is cheap: nothing is reinstalled while requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pair=$(grep -E '^(torch|torchvision)==' requirements.txt | tr '\n' ' ')
    "$VENV/bin/pip" install -q --isolated $pair
    "$VENV/bin/pip" install -q -r requirements.txt
    "$VENV/bin/pip" install -q --no-deps -e .
    "$VENV/bin/pip" check
    echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import adyolo, torch, torchvision; print(f'adyolo {adyolo.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}')"
