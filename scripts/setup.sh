#!/usr/bin/env bash
# Create .venv (if missing) and install lpengine with the given extras. Idempotent; used by demo.sh, test.sh, CI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-analysis}"  # video analysis is on by default in a batch, so it is installed by default
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lpengine needs Python >= 3.11")'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
