#!/usr/bin/env bash
# Set up and run the bundled demo against the in-process DashScope emulator (no API key, no cost).
# Exit 0 when every portrait made a video and the coffee-cup photo was refused by the face check, on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh emulator,analysis
exec .venv/bin/python -m lpengine demo --output output/demo "$@"
