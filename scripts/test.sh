#!/usr/bin/env bash
# Sets up and runs every check: generated code freshness, mypy, and the whole test suite
# (unit and integration, against real nx-27017, moto's S3 server, Ray and Envoy).
# Exits non-zero if anything fails or if no test ran (pytest exits 5 then).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python scripts/generate_protos.py --check
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
