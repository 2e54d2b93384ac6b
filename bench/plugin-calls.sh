#!/usr/bin/env bash
# Cost of plugin calls (see `switchyard bench plugins --help`): a WebAssembly tokenizer patch
# on a 1,000-id prompt (the identity guest and the pair-merge template), and native KV
# allocator calls through the C ABI beside the built-in allocator.
# Writes bench/results/plugin-calls.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --quiet
./scripts/build-wasm-plugins.sh >/dev/null
dir=$(mktemp -d)
target/release/switchyard plugin pack target/release/libswitchyard_kv_heap.so --out "$dir" >/dev/null
pairs=$(printf 'vocab 49152\n'; for i in $(seq 0 199); do echo "pair $((i * 7)) $((i * 13 + 1))"; done)
{
  echo '{"machine": "'"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPU"'",'
  echo '"identity": '
  target/release/switchyard bench plugins --patch target/wasm-plugins/faulty-patch/faulty-patch.toml \
    --patch-config ok --kv-plugin "$dir/kv-heap.toml" --json
  echo ', "pair_merge_200_pairs": '
  target/release/switchyard bench plugins --patch target/wasm-plugins/wasm-tokenizer-patch/pair-merge-patch.toml \
    --patch-config "$pairs" --kv-plugin "$dir/kv-heap.toml" --json
  echo '}'
} | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin), indent=2))' > bench/results/plugin-calls.json
rm -rf "$dir"
cat bench/results/plugin-calls.json
