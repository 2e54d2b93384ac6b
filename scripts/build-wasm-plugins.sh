#!/usr/bin/env bash
# Build the WebAssembly plugin guests and pack them (component + manifest) into
# target/wasm-plugins/<guest>/. Usage: scripts/build-wasm-plugins.sh [GUEST_DIR...]
# (default: every guest of the repository).
#
# Toolchain (see ../shared/TOOLCHAIN.md): a rustup wasm32-unknown-unknown target when one is
# installed; otherwise Debian's rustc-web (1.96) with its std sources and wasm-ld-22, which
# this script installs with apt-get when it runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
guests=("$@")
if [ ${#guests[@]} -eq 0 ]; then
  guests=(plugins/adaptivocab tests/plugins/faulty-patch sdk/template/wasm-tokenizer-patch)
fi

if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  mode=rustup
else
  mode=debian
  if [ ! -x /usr/bin/rustc ] || ! command -v wasm-ld-22 >/dev/null || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== installing Debian's rustc-web, rust-web-src and lld-22 (WebAssembly guests)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc-web cargo-web rust-web-src lld-22 >/dev/null
    else
      echo "error: no wasm32 toolchain: run 'rustup target add wasm32-unknown-unknown', or install" >&2
      echo "  Debian's rustc-web cargo-web rust-web-src lld-22 (as root)" >&2
      exit 1
    fi
  fi
fi

sy="$root/target/release/switchyard"
if [ ! -x "$sy" ]; then
  cargo build --release -p switchyard-cli
fi

for g in "${guests[@]}"; do
  name=$(basename "$g")
  echo "== wasm guest $g ($mode toolchain)"
  (
    cd "$g"
    export CARGO_TARGET_DIR="$root/target/wasm-guests"
    if [ "$mode" = rustup ]; then
      # The guest's .cargo/config.toml names Debian's rustc and build-std; override both.
      cargo build --release --target wasm32-unknown-unknown \
        --config 'build.rustc="rustc"' --config 'target.wasm32-unknown-unknown.linker="rust-lld"' \
        --config 'unstable.build-std=[]'
    else
      RUSTC_BOOTSTRAP=1 cargo build --release
    fi
  )
  crate=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$g/Cargo.toml" | head -1 | tr - _)
  wasm="$root/target/wasm-guests/wasm32-unknown-unknown/release/$crate.wasm"
  rm -rf "target/wasm-plugins/$name"
  "$sy" plugin pack "$wasm" --out "target/wasm-plugins/$name"
done
