#!/usr/bin/env bash
# Regenerates service/proto/grpc_service_pb2{,_grpc}.py from service/proto/grpc_service.proto.
# Uses grpcio-tools 1.76 (protoc 6.31): its gencode runs on protobuf 6.31+ and 7.x, so the
# stubs work with both the tritonclient-compatible protobuf 6 and newer runtimes.
# Usage: scripts/gen-grpc.sh [python]   (default: .venv/bin/python; it needs grpcio-tools)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I service/proto --python_out=service/proto \
    --pyi_out=service/proto --grpc_python_out=service/proto service/proto/grpc_service.proto
# protoc writes `import grpc_service_pb2`; the stubs live in the service.proto package
sed -i 's/^import grpc_service_pb2 as/from service.proto import grpc_service_pb2 as/' \
    service/proto/grpc_service_pb2_grpc.py
