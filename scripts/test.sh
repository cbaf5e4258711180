#!/usr/bin/env bash
# Set up and run the test suite (the emulator and an S3 server are started on 127.0.0.1 by the tests themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
