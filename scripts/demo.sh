#!/usr/bin/env bash
# Set up and run the bundled demo against the in-process DashScope emulator (no API key, no cost).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh emulator
exec .venv/bin/python -m lpengine run configs/demo.yaml "$@"
