#!/usr/bin/env bash
# The main job: a cluster in network namespaces where live flows survive live migration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/convergent lab demo "$@"
