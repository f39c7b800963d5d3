#!/usr/bin/env bash
# Creates .venv/ in the repo root with conceptguard and the locked dependencies of one set:
#   scripts/setup.sh [--serve]   the serving set (ONNX Runtime, no torch): scripts/demo.sh
#   scripts/setup.sh --offline   + torch and the offline job, and Debian's Fashion-MNIST
#   scripts/setup.sh --dev       + Ray and the test tools, and the Debian packages the tests
#                                run (Prometheus, docker-compose, yamllint, shellcheck, Chromium)
# The versions and sha256 hashes come from requirements/*.lock (scripts/lock.sh regenerates
# them from pyproject.toml). Idempotent: a second run only checks; a set includes the smaller
# ones, so --dev after --serve adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

set_name=serve
case "${1:---serve}" in
  --serve) set_name=serve ;;
  --offline) set_name=offline ;;
  --dev) set_name=dev ;;
  *) echo "scripts/setup.sh: unknown option '$1' (use --serve, --offline or --dev)" >&2; exit 2 ;;
esac

apt_packages=()
[[ $set_name != serve ]] && apt_packages+=(dataset-fashion-mnist)
[[ $set_name == dev ]] && apt_packages+=(prometheus docker-compose yamllint shellcheck chromium wrk)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; }
fi

# a system pip that can install into another interpreter (pip >= 22.3: --python) spares the
# venv its own pip (ensurepip alone takes longer than installing the whole serving set)
sys_pip=0
python3 -m pip --python "$(command -v python3)" --version >/dev/null 2>&1 && sys_pip=1
if [[ ! -x .venv/bin/python ]]; then
  if ((sys_pip)); then python3 -m venv --without-pip .venv; else python3 -m venv .venv; fi
fi
lock="requirements/${set_name}.lock"
lock_hash() { cat "requirements/$1.lock" requirements/no-deps.lock requirements/bootstrap.lock \
  pyproject.toml | sha256sum | cut -c1-16; }
want=$(lock_hash "$set_name")
stamp=".venv/.conceptguard-${set_name}"
installed=0  # this set, or a larger one (the locks agree on every version), is in place
for s in serve offline dev; do
  [[ $s == "$set_name" ]] && found=1
  [[ ${found:-0} == 1 && -f .venv/.conceptguard-$s ]] && \
    [[ "$(cat ".venv/.conceptguard-$s")" == "$(lock_hash "$s")" ]] && installed=1
done
if ((!installed)); then
  echo "installing the ${set_name} set into .venv from ${lock}" >&2
  log=$(mktemp); trap 'rm -f "$log"' EXIT
  quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "scripts/setup.sh: failed: $*" >&2; exit 1; }; }
  # uv installs the locks (parallel downloads: the serving set in seconds); pip only brings uv
  if [[ ! -x .venv/bin/uv ]]; then
    pip=(.venv/bin/python -m pip)
    .venv/bin/python -m pip --version >/dev/null 2>&1 || pip=(python3 -m pip --python .venv/bin/python)
    quiet "${pip[@]}" install -q --disable-pip-version-check --require-hashes \
      -r requirements/bootstrap.lock
  fi
  uv=(.venv/bin/uv pip install -q --python .venv/bin/python)
  quiet "${uv[@]}" --require-hashes -r "$lock"
  if [[ $set_name != serve ]]; then
    # torchattacks (offline attacks) and pytorch-ood (the tests' reference detectors) pin
    # requests/urllib3 of 2020 in their metadata; their code runs on the locked ones, so they
    # go in without their dependency metadata (requirements/no-deps.lock; scripts/lock.sh)
    quiet "${uv[@]}" --require-hashes --no-deps -r requirements/no-deps.lock
  fi
  # the package itself, editable; its dependencies are the lock's
  quiet "${uv[@]}" --no-deps -e .
  if [[ $set_name != serve ]]; then
    # bytecode now, once: where PYTHONDONTWRITEBYTECODE is set (CI images, Docker) every
    # process would otherwise compile torch & co. from source again (~14 s of CPU per build
    # process on 2 cores). A few test files of torch are Python 3.12 syntax and fail to
    # compile, hence no exit status check; everything else is compiled.
    echo "compiling the installed packages to bytecode" >&2
    .venv/bin/python -m compileall -qq -j 0 .venv/lib/python3*/site-packages >/dev/null 2>&1 \
      || true
  fi
  echo "$want" > "$stamp"
fi
