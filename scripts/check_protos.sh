#!/usr/bin/env bash
# Fail when the committed generated code differs from what protos/ generates now.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
bash "$root/scripts/gen_protos.sh" "$tmp" >/dev/null 2>&1
status=0
while IFS= read -r generated; do
  rel="${generated#"$tmp"/}"
  if ! cmp -s "$generated" "$root/libs/$rel"; then
    echo "stale generated file: libs/$rel (run 'make protos')" >&2
    status=1
  fi
done < <(find "$tmp" -type f -name '*_pb2*')
committed=$(cd "$root/libs" && find nudge -name '*_pb2*' -type f | sort)
fresh=$(cd "$tmp" && find nudge -name '*_pb2*' -type f | sort)
if [ "$committed" != "$fresh" ]; then
  echo "generated files differ in name from protos/ (run 'make protos')" >&2
  status=1
fi
exit $status
