#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then serve the shipped demo bank
# (Fashion-MNIST, demo ResNet, ConSE VLM). With --rebuild, first retrain the demo classifier
# and rebuild banks/demo with the offline job (~20 minutes on 2 cores).
# Usage: scripts/demo.sh [--rebuild] [--port 8000]
set -euo pipefail
cd "$(dirname "$0")/.."
rebuild=0; port=8000
while (($#)); do
  case "$1" in
    --rebuild) rebuild=1 ;;
    --port) port="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cg=.venv/bin/conceptguard
if ((rebuild)) || [[ ! -f banks/demo/manifest.json ]]; then
  $cg train-demo --config configs/fashion-mnist-demo.yaml
  $cg build-bank --config configs/fashion-mnist-demo.yaml --out banks/demo
fi

cat <<MSG

conceptguard is starting on http://127.0.0.1:${port} (bank: banks/demo). Try:

  curl -s -F file=@examples/coat.png http://127.0.0.1:${port}/v1/classify | python3 -m json.tool
  curl -s -F file=@examples/noise.png http://127.0.0.1:${port}/v1/classify | python3 -m json.tool
  curl -s http://127.0.0.1:${port}/metrics | grep conceptguard_predictions_total

API docs: http://127.0.0.1:${port}/docs   report: banks/demo/report/index.html

MSG
exec $cg serve --bank banks/demo --host 127.0.0.1 --port "$port"
