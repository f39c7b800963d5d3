#!/usr/bin/env bash
# The test suite: set up .venv with the dev set (and the Debian packages the tests run), then
# pytest. `scripts/test.sh --fast` runs the fast tier only (every module's unit tests, no bank
# builds, no Ray, no load or soak tests: pytest -m "not slow"). Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [[ $a == --fast ]]; then args+=(-m "not slow"); else args+=("$a"); fi
done
scripts/setup.sh --dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "${args[@]}"
