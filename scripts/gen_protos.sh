#!/usr/bin/env bash
# Regenerate the committed Python gRPC code from protos/**/*.proto.
#   scripts/gen_protos.sh            write beside the .proto files (commit the result)
#   scripts/gen_protos.sh OUT_DIR    write into OUT_DIR instead (the sync test compares)
# Paths are relative to the repository root, so the generated modules import each
# other as `protos.arbitrage.v1.arbitrage_pb2` (the installed package layout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${1:-.}"
mkdir -p "$OUT"
mapfile -t PROTOS < <(find protos -name '*.proto' | sort)
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "${PROTOS[@]}"
