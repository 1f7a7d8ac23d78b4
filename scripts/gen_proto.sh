#!/usr/bin/env bash
# Regenerate the Python stubs of the reward protocol beside the .proto (proto/sana_rl/reward/v1/).
#   bash scripts/gen_proto.sh            # writes into proto/
#   bash scripts/gen_proto.sh /tmp/out   # writes into /tmp/out/sana_rl/reward/v1/ (the staleness test)
# The stubs import `sana_rl.reward.v1`, which pyproject.toml maps to proto/sana_rl.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/proto}"
python="${PYTHON:-$root/.venv/bin/python}"
mkdir -p "$out"
cd "$root/proto"
"$python" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  sana_rl/reward/v1/reward.proto
