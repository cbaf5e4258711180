#!/usr/bin/env bash
# Set up and run the bundled demo against the in-process DashScope emulator (no API key, no cost).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh emulator,analysis
code=0
.venv/bin/python -m lpengine run configs/demo.yaml "$@" || code=$?
if [ "$code" -eq 1 ]; then
  # exit 1 = "some items failed": the demo includes a coffee cup on purpose, to show a detect refusal
  echo "demo finished: the coffee-cup photo was refused by detect on purpose; open output/demo/report.html"
  exit 0
fi
exit "$code"
