#!/usr/bin/env bash
# The test suite: set up .venv with the dev extras (and the Debian packages the tests run:
# prometheus, docker-compose), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
