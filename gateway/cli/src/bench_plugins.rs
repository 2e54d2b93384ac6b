//! `switchyard bench plugins`: what a plugin call costs.
//!
//! - WebAssembly tokenizer patch: one `encode` and one `decode` of a prompt of N ids (default
//!   1,000) through wasmtime (copying the ids into and out of the guest, the component-model
//!   lifting, the guest's work), an empty call (0 ids: the fixed cost), and the per-token
//!   `decode` the scheduler makes for every generated token; the same work done by plain Rust
//!   in this process is the peer.
//! - Native plugin: the same KV-allocator calls (`capacity`, `ensure`, `kv`) through the C ABI
//!   (kv-heap plugin) and on the engine's built-in allocator, side by side.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use switchyard_engine::kv::{HeapKv, KvAllocator, KvLayout};
use switchyard_plugin_host::{PluginHost, WasmLimits};

#[derive(Args)]
pub struct PluginBenchArgs {
    /// A tokenizer-patch plugin's manifest (its directory is the plugin directory).
    #[arg(long)]
    patch: PathBuf,
    /// The patch's configuration text.
    #[arg(long, default_value = "")]
    patch_config: String,
    /// A kv-allocator plugin's manifest.
    #[arg(long)]
    kv_plugin: PathBuf,
    /// Prompt length in ids.
    #[arg(long, default_value_t = 1000)]
    tokens: usize,
    /// Timed calls per measurement (the median of 5 rounds is reported).
    #[arg(long, default_value_t = 2000)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

/// Median over 5 rounds of the mean time per call, in nanoseconds.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters.div_ceil(10) {
        f();
    }
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn host_for(manifest: &Path) -> PluginHost {
    let dir = manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    PluginHost::new(&[dir])
}

pub fn bench_plugins(a: PluginBenchArgs) -> Result<()> {
    let n = a.tokens;
    // Ids spread like real text over a 49,152 vocabulary.
    let mut x = 0x9e3779b97f4a7c15u64;
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 49_152) as u32
        })
        .collect();

    let wasm = std::sync::Arc::new(
        host_for(&a.patch)
            .load_wasm(&a.patch)
            .with_context(|| format!("loading {}", a.patch.display()))?,
    );
    let patch = wasm
        .tokenizer_patch(a.patch_config.as_bytes(), WasmLimits::default(), None)
        .context("initializing the patch")?;
    let enc = patch.encode(&ids)?;
    anyhow::ensure!(
        patch.decode(&enc)? == ids,
        "the patch does not round-trip the benchmark ids"
    );
    let it = a.iters;
    let wasm_encode = time(it, || {
        black_box(patch.encode(black_box(&ids)).unwrap());
    });
    let wasm_decode = time(it, || {
        black_box(patch.decode(black_box(&enc)).unwrap());
    });
    let wasm_empty = time(it * 5, || {
        black_box(patch.encode(black_box(&[])).unwrap());
    });
    let wasm_one = time(it * 5, || {
        black_box(patch.decode(black_box(&enc[..1])).unwrap());
    });
    // The peer: the same copy-through in plain Rust (what an identity patch costs natively).
    let rust_copy = time(it * 5, || {
        black_box(black_box(&ids).to_vec());
    });

    // Native: kv-heap through the ABI vs the built-in allocator.
    let layout = KvLayout {
        n_layers: 30,
        kv_heads: 3,
        head_dim: 64,
        max_context: 2048,
        max_slots: 8,
    };
    let plugin = host_for(&a.kv_plugin)
        .load_native(&a.kv_plugin)
        .with_context(|| format!("loading {}", a.kv_plugin.display()))?;
    let mut native = plugin.kv_allocator("", layout)?;
    let mut builtin = HeapKv::new(layout);
    let mut calls = Vec::new();
    for (name, kv) in [
        ("plugin", &mut native as &mut dyn KvAllocator),
        ("builtin", &mut builtin as &mut dyn KvAllocator),
    ] {
        let s = kv.acquire()?;
        kv.ensure(s, 512)?;
        let cap = time(it * 50, || {
            black_box(kv.capacity(black_box(s)));
        });
        let ensure = time(it * 50, || {
            kv.ensure(black_box(s), black_box(300)).unwrap();
        });
        let kvp = time(it * 50, || {
            black_box(kv.kv(black_box(7), black_box(s)));
        });
        kv.release(s);
        calls.push((name, cap, ensure, kvp));
    }
    let native_json =
        |i: usize| json!({"capacity_ns": calls[i].1, "ensure_ns": calls[i].2, "kv_ns": calls[i].3});
    let out = json!({
        "tokens": n,
        "wasm_patch": {
            "plugin": wasm.name,
            "encode_ns": wasm_encode,
            "decode_ns": wasm_decode,
            "encode_per_token_ns": wasm_encode / n as f64,
            "empty_call_ns": wasm_empty,
            "decode_one_token_ns": wasm_one,
            "rust_copy_ns": rust_copy,
        },
        "native_kv": {"plugin": plugin.name, "through_abi": native_json(0), "builtin": native_json(1)},
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "WebAssembly patch {} on {n} ids: encode {:.1} µs, decode {:.1} µs ({:.1} ns/id); \
             empty call {:.2} µs; one-id decode {:.2} µs; plain Rust copy of the ids {:.2} µs",
            wasm.name,
            wasm_encode / 1e3,
            wasm_decode / 1e3,
            wasm_encode / n as f64,
            wasm_empty / 1e3,
            wasm_one / 1e3,
            rust_copy / 1e3
        );
        for (name, cap, ensure, kvp) in &calls {
            println!(
                "KV allocator ({name}): capacity {cap:.1} ns, ensure {ensure:.1} ns, kv {kvp:.1} ns"
            );
        }
    }
    Ok(())
}
