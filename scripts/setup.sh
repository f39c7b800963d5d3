#!/usr/bin/env bash
# Creates .venv/ in the repo root with conceptguard and its dependencies, and installs the
# Debian packages the project uses (Fashion-MNIST data; Prometheus, docker-compose and headless
# Chromium for the tests). Idempotent: a second run only checks. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

apt_packages=(dataset-fashion-mnist)
[[ -n "$extras" ]] && apt_packages+=(prometheus docker-compose yamllint shellcheck chromium)
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
  touch "$stamp"
fi
