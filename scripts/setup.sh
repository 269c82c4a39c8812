#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the project with its development extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [[ -z "$python_bin" ]]; then
  echo "modelservice needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: that CPU wheel is what the build machines have.
.venv/bin/python -m pip install --quiet --editable '.[dev]'
