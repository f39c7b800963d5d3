#!/usr/bin/env bash
# The main job on the embedded default: set up .venv with the serving set alone (ONNX Runtime,
# no torch) and serve the shipped demo bank (Fashion-MNIST, demo ResNet, ConSE VLM).
# With --rebuild, first install the offline set (torch, the VLM, the attack library), retrain
# the demo classifier and rebuild banks/demo with the offline job.
# Usage: scripts/demo.sh [--rebuild] [--port 8000]
set -euo pipefail
cd "$(dirname "$0")/.."
rebuild=0; port=8000
while (($#)); do
  case "$1" in
    --rebuild) rebuild=1 ;;
    --port) port="$2"; shift ;;
    *) echo "scripts/demo.sh: unknown option '$1' (use --rebuild, --port N)" >&2; exit 2 ;;
  esac
  shift
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ((rebuild)) || [[ ! -f banks/demo/manifest.json ]]; then
  scripts/setup.sh --offline
  .venv/bin/conceptguard train-demo --config configs/fashion-mnist-demo.yaml
  .venv/bin/conceptguard build-bank --config configs/fashion-mnist-demo.yaml --out banks/demo
else
  scripts/setup.sh --serve
fi

cat <<MSG

conceptguard is starting on http://127.0.0.1:${port} (bank: banks/demo). Try:

  curl -s -F file=@examples/coat.png http://127.0.0.1:${port}/v1/classify | python3 -m json.tool
  curl -s -F file=@examples/noise.png http://127.0.0.1:${port}/v1/classify | python3 -m json.tool
  curl -s http://127.0.0.1:${port}/metrics | grep conceptguard_predictions_total

API docs: http://127.0.0.1:${port}/docs   report: banks/demo/report/index.html

MSG
exec .venv/bin/conceptguard serve --bank banks/demo --host 127.0.0.1 --port "$port"
