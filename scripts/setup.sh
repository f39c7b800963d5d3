#!/usr/bin/env bash
# Creates .venv/ in the repo root with conceptguard and its dependencies, and installs the
# Debian packages the project uses (Fashion-MNIST data; Prometheus, docker-compose and headless
# Chromium for the tests). Idempotent: a second run only checks. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

# the offline job (demo.sh --rebuild) needs the offline extra; the tests need dev
extras="[offline]"
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

apt_packages=(dataset-fashion-mnist)
[[ "$extras" == "[dev]" ]] && apt_packages+=(prometheus docker-compose yamllint shellcheck chromium)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update -qq && $sudo apt-get install -y --no-install-recommends "${missing[@]}"; }
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=".venv/.conceptguard-installed${extras}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "installing Python dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".${extras}"
  # the attack library (offline job) and the OOD-detection library (tests) pin ancient
  # requests/urllib3; their code runs with current ones, so they go in without their pins
  no_deps=("torchattacks==3.5.1")
  [[ "$extras" == "[dev]" ]] && no_deps+=("pytorch-ood==0.4.0")
  .venv/bin/python -m pip install -q --no-deps "${no_deps[@]}"
  touch "$stamp"
fi
