#!/usr/bin/env bash
# The test suite: set up .venv with the dev set (and the Debian packages the tests run), then
# pytest. `scripts/test.sh --fast` runs the fast tier only (every module's unit tests, no bank
# builds, no Ray, no load or soak tests: pytest -m "not slow"). Other arguments go to pytest.
# The tests run on two pytest-xdist workers (CONCEPTGUARD_TEST_WORKERS, default 2; 0 runs them in
# this process); each test module stays on one worker (conftest.py), and the session's tiny
# bank is built once for both.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for a in "$@"; do
  if [[ $a == --fast ]]; then args+=(-m "not slow"); else args+=("$a"); fi
done
scripts/setup.sh --dev
# this checkout's own bytecode (the test servers and CLI runs are separate processes; where
# PYTHONDONTWRITEBYTECODE is set, each would compile these again)
.venv/bin/python -m compileall -qq -j 0 conceptguard service offline tests benchmarks scripts \
  >/dev/null 2>&1 || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
workers=${CONCEPTGUARD_TEST_WORKERS:-2}
# one OpenMP thread per process (torch's CPU kernels) unless the caller says otherwise: the
# workers already keep the cores busy, and the extra threads of each build or server spun
# against the other worker's (measured on 2 cores: whole suite 553 s -> 409 s)
if [[ $workers == 0 ]]; then
  xdist=()
else
  xdist=(-n "$workers" --dist loadgroup)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec .venv/bin/python -m pytest -q "${xdist[@]}" "${args[@]}"
