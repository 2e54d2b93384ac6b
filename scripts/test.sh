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
# libnvrtc from the fetched wheel: the CUDA kernels must compile (no GPU is needed for that;
# the GPU tests in tests/tests/cuda.rs skip without one, see scripts/gpu-run.sh).
export LD_LIBRARY_PATH="$(pwd)/.cache/nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SWITCHYARD_REQUIRE_NVRTC=1
cargo test --workspace --release
