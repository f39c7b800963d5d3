#!/usr/bin/env bash
# Regenerates the lock files in requirements/ from pyproject.toml (exact versions + sha256
# hashes, for Linux, macOS and Windows, Python 3.11+). scripts/setup.sh and the Dockerfile
# install from them with `pip install --require-hashes`.
#   serve.lock    the serving set (scripts/demo.sh, the default Docker image)
#   offline.lock  + torch and the offline job (demo.sh --rebuild, setup.sh --offline)
#   dev.lock      + Ray and the test tools (scripts/test.sh, CI)
#   ray.lock      serving + Ray Serve (the KubeRay image: Dockerfile LOCK=ray)
#   gpu.lock      serving + torch + onnxruntime-gpu (the CUDA image: Dockerfile LOCK=gpu)
#   bootstrap.lock  uv, the installer setup.sh uses for the rest (fast, parallel)
#   no-deps.lock  torchattacks and pytorch-ood: their metadata pins requests/urllib3 of 2020,
#                 which the rest needs newer; their code runs with current ones, so they are
#                 installed with --no-deps (their real imports, torch/scipy/numpy, are in
#                 offline.lock)
# Usage: scripts/lock.sh [--upgrade]     (needs uv: .venv/bin/python -m pip install uv)
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-$(command -v uv || echo .venv/bin/uv)}
[[ -x "$uv" ]] || { echo "scripts/lock.sh: uv not found (pip install uv)" >&2; exit 2; }
opts=(--quiet --universal --python-version 3.11 --generate-hashes --no-header
      --index-url https://pypi.org/simple --constraint requirements/pins.txt)
[[ "${1:-}" == "--upgrade" ]] && opts+=(--upgrade)
compile() {  # compile OUT [--extra X ...]
  local out=$1; shift
  "$uv" pip compile pyproject.toml "${opts[@]}" "$@" -o "requirements/$out"
}
# dev first; the smaller sets are held to its versions, so installing one set after another
# never changes a version the other installed
compile dev.lock --extra dev
pins=requirements/.dev-pins.txt; trap 'rm -f "$pins"' EXIT  # a stable name: it shows in the annotations
sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\)\( ;\(.*\)\)\{0,1\} \\$/\1\2/p' requirements/dev.lock > "$pins"
compile offline.lock --extra offline --constraint "$pins"
compile serve.lock --constraint "$pins"
compile gpu.lock --extra gpu --extra torch --constraint "$pins"
compile ray.lock --extra ray --constraint "$pins"
printf 'torchattacks==3.5.1\npytorch-ood==0.4.0\n' > requirements/no-deps.in
# the installer that setup.sh bootstraps with pip, then installs every lock with
printf 'uv==0.13.9\n' > requirements/bootstrap.in
"$uv" pip compile requirements/bootstrap.in "${opts[@]}" -o requirements/bootstrap.lock
"$uv" pip compile requirements/no-deps.in "${opts[@]}" --no-deps -o requirements/no-deps.lock
echo "requirements/*.lock regenerated" >&2
