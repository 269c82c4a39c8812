#!/usr/bin/env bash
# Sets up and runs the service with embedded defaults (MongoDB, archives, Ray, Envoy).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m server "$@"
