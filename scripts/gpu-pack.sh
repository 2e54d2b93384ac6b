#!/usr/bin/env bash
# Build the release binary (CUDA feature on) and the GPU test binary here, and put them,
# stripped, with stories260K into DIR (default .gpu, git-ignored) for a GPU machine.
set -euo pipefail
DIR=${1:-.gpu}
STORIES=${SWITCHYARD_STORIES:-../shared/models/stories260K}
mkdir -p "$DIR"
cargo build --release -p switchyard-cli
strip -o "$DIR/switchyard" target/release/switchyard
# The larosa plugin (the CPU gateway it is compared with, and its configuration check).
cargo build --release -p switchyard-larosa
cp target/release/libswitchyard_larosa.so "$DIR/"
exe=$(cargo test --release -p switchyard-tests --test cuda --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*cuda-[^"]*"' | tail -1 | cut -d'"' -f4)
strip -o "$DIR/cuda-tests" "$exe"
rm -rf "$DIR/stories260K"
mkdir -p "$DIR/stories260K"
cp "$STORIES"/{config.json,model.safetensors,reference_greedy.json,stories260K.f32.gguf,tokenizer.json,tokenizer_config.json,special_tokens_map.json,generation_config.json} "$DIR/stories260K/" 2>/dev/null || true
du -sh "$DIR"
