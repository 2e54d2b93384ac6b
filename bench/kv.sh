#!/usr/bin/env bash
# KV allocators on the default model's layout (SmolLM2-135M: 30 layers x 3 KV heads x 64):
# vAttention vs static allocation vs the engine's heap allocator. See `switchyard bench kv
# --help`. Writes bench/results/kv-SmolLM2-135M.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --release --quiet
./scripts/fetch-default-model.sh >/dev/null
target/release/switchyard bench kv --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --max-context 2048 --slots 16 --sequences 256 --budget-mb 1024 --page-kb 64 \
  --decode-batch 8 --decode-tokens 256 --rounds 3 "$@" > bench/results/kv-SmolLM2-135M.json
python3 -c 'import json; print(json.dumps(json.load(open("bench/results/kv-SmolLM2-135M.json")), indent=2))' \
  | tee bench/results/kv-SmolLM2-135M.json.tmp
mv bench/results/kv-SmolLM2-135M.json.tmp bench/results/kv-SmolLM2-135M.json
