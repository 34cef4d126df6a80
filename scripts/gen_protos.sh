#!/usr/bin/env bash
# Generate Python code, type stubs and gRPC stubs from protos/ into $1 (default: libs).
set -euo pipefail
out="${1:-libs}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv_bin="$root/.venv/bin"
export PATH="$venv_bin:$PATH"   # mypy-protobuf's protoc plugins must be on PATH
cd "$root/protos"
files=$(find nudge -name '*.proto' | sort)
"$venv_bin/python" -m grpc_tools.protoc -I. \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" $files
for f in $files; do
  d="$out/$(dirname "$f")"
  while [ "$d" != "$out/nudge" ] && [ "$d" != "$out" ]; do
    [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
    d="$(dirname "$d")"
  done
done
