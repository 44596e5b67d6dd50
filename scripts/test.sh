#!/usr/bin/env bash
# The whole test suite: lint, types, unit and functional tests (namespaces, real kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
