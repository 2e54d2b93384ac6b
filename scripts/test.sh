#!/usr/bin/env bash
# The project's test command: fetch test data (default model, llama.cpp tokenizer vectors),
# check formatting and lints, run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-data.sh
cargo fmt --all -- --check
cargo clippy --workspace --release --all-targets -- -D warnings
cargo build --workspace --release  # the plugin libraries the host tests load
./scripts/build-wasm-plugins.sh    # the WebAssembly guests (test and template plugins)
cargo test --workspace --release
