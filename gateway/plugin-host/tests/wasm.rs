//! WebAssembly plugins through the host: the template patch round-trips; a guest that traps,
//! loops forever or grows its memory past the cap fails only that call, with a clear error;
//! components that are not what the manifest promises are refused.
//! The guests are built and packed by scripts/build-wasm-plugins.sh (scripts/test.sh runs it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_plugin_host::{
    sha256_file, HostError, PluginHost, WasmCallError, WasmLimits, WasmPlugin,
};

fn packed(guest: &str) -> PathBuf {
    let d = switchyard_tests::root()
        .join("target/wasm-plugins")
        .join(guest);
    assert!(
        d.is_dir(),
        "{} is missing: run scripts/build-wasm-plugins.sh first",
        d.display()
    );
    d
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-wasm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(guest: &str, name: &str) -> Arc<WasmPlugin> {
    let dir = packed(guest);
    let host = PluginHost::new(std::slice::from_ref(&dir));
    Arc::new(host.load_wasm(&dir.join(format!("{name}.toml"))).unwrap())
}

fn limits(ms: u64, mib: usize) -> WasmLimits {
    WasmLimits {
        call_deadline: Duration::from_millis(ms),
        max_memory: mib << 20,
    }
}

#[test]
fn template_patch_round_trips() {
    let p = load("wasm-tokenizer-patch", "pair-merge-patch");
    let cfg = b"vocab 100\npair 1 2\npair 2 3\n";
    let t = p.tokenizer_patch(cfg, limits(1000, 64), None).unwrap();
    let ids = vec![5, 1, 2, 3, 2, 3, 1, 2, 2, 99];
    let enc = t.encode(&ids).unwrap();
    assert_eq!(enc, vec![5, 100, 3, 101, 100, 2, 99]);
    assert_eq!(t.decode(&enc).unwrap(), ids);
    let info = t.info().unwrap();
    assert_eq!(info.name, "pair-merge-patch");
    assert_eq!((info.base_vocab_size, info.patched_vocab_size), (100, 102));
    // 1,000 random ids round-trip.
    let mut x = 12345u64;
    let long: Vec<u32> = (0..1000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 4) as u32
        })
        .collect();
    assert_eq!(t.decode(&t.encode(&long).unwrap()).unwrap(), long);
    // A bad configuration refuses the plugin with the guest's message.
    let e = p
        .tokenizer_patch(b"pair 1 2\n", limits(1000, 64), None)
        .unwrap_err();
    assert!(e.to_string().contains("`vocab N` must come before"), "{e}");
    // Guest errors are errors, not traps.
    let e = t.decode(&[500]).unwrap_err();
    assert!(
        matches!(&e, WasmCallError::Guest { msg, .. } if msg.contains("not in the patched")),
        "{e}"
    );
}

#[test]
fn a_trap_fails_one_call_and_the_next_call_gets_a_fresh_instance() {
    let p = load("faulty-patch", "faulty-patch");
    let t = p.tokenizer_patch(b"trap", limits(1000, 64), None).unwrap();
    let e = t.encode(&[1, 2, 3]).unwrap_err();
    assert!(matches!(e, WasmCallError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("encode trapped"), "{e}");
    assert_eq!(t.traps(), 1);
    // decode does not trap in this mode: it runs on a new, re-initialized instance.
    assert_eq!(t.decode(&[7, 8]).unwrap(), vec![7, 8]);
    let e = t.encode(&[1]).unwrap_err();
    assert!(matches!(e, WasmCallError::Trap { .. }), "{e}");
    assert_eq!(t.traps(), 2);
}

#[test]
fn an_endless_loop_is_stopped_at_the_deadline() {
    let p = load("faulty-patch", "faulty-patch");
    let t = p.tokenizer_patch(b"loop", limits(100, 64), None).unwrap();
    let t0 = Instant::now();
    let e = t.encode(&[1, 2, 3]).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(e, WasmCallError::Deadline { .. }), "{e}");
    assert!(e.to_string().contains("deadline of 100ms"), "{e}");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(t.decode(&[4]).unwrap(), vec![4]);
}

#[test]
fn memory_growth_past_the_cap_is_refused() {
    let p = load("faulty-patch", "faulty-patch");
    let t = p.tokenizer_patch(b"grow", limits(5000, 16), None).unwrap();
    let e = t.encode(&[1, 2, 3]).unwrap_err();
    assert!(matches!(e, WasmCallError::Memory { cap: 16, .. }), "{e}");
    assert!(e.to_string().contains("cap of 16 MiB"), "{e}");
    assert_eq!(t.decode(&[4]).unwrap(), vec![4]);
}

#[test]
fn init_errors_refuse_the_plugin() {
    let p = load("faulty-patch", "faulty-patch");
    let e = p
        .tokenizer_patch(b"init-error", limits(1000, 64), None)
        .unwrap_err();
    assert!(e.to_string().contains("refusing to start"), "{e}");
}

/// Write `bytes` as a plugin with a manifest into `dir`.
fn install(dir: &Path, name: &str, file: &str, bytes: &[u8], abi: &str) -> PathBuf {
    std::fs::write(dir.join(file), bytes).unwrap();
    let sha = sha256_file(&dir.join(file)).unwrap();
    let m = dir.join(format!("{name}.toml"));
    std::fs::write(
        &m,
        format!("name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"tokenizer-patch\"\nabi = \"{abi}\"\nfile = \"{file}\"\nsha256 = \"{sha}\"\n"),
    )
    .unwrap();
    m
}

#[test]
fn wrong_components_are_refused_with_clear_errors() {
    let dir = tmpdir("bad");
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let good = std::fs::read(packed("faulty-patch").join("faulty-patch.wasm")).unwrap();

    // A newer WIT minor than the host's, and another major.
    for abi in ["1.1", "2.0"] {
        let m = install(&dir, "faulty-patch", "f.wasm", &good, abi);
        let e = host.load_wasm(&m).unwrap_err();
        assert!(matches!(e, HostError::Handshake { .. }), "{e}");
        assert!(e.to_string().contains("majors must be equal"), "{e}");
    }
    // The manifest names another plugin than the component's info().
    let m = install(&dir, "other", "f.wasm", &good, "1.0");
    let e = host.load_wasm(&m).unwrap_err();
    assert!(e.to_string().contains("the manifest says \"other\""), "{e}");
    // A core module is not a component.
    let core = wat::parse_str("(module)").unwrap();
    let m = install(&dir, "core", "core.wasm", &core, "1.0");
    let e = host.load_wasm(&m).unwrap_err();
    assert!(e.to_string().contains("switchyard plugin pack"), "{e}");
    // A component that asks for WASI is refused: no capabilities are granted.
    let wasi = wat::parse_str(
        r#"(component
             (import "wasi:cli/environment@0.2.0"
               (instance (export "get-arguments" (func (result (list string)))))))"#,
    )
    .unwrap();
    let m = install(&dir, "wasi", "wasi.wasm", &wasi, "1.0");
    let e = host.load_wasm(&m).unwrap_err();
    assert!(e.to_string().contains("no WASI"), "{e}");
    assert!(e.to_string().contains("wasi:cli/environment"), "{e}");
    // Garbage.
    let m = install(&dir, "junk", "junk.wasm", b"\0asm\x0d\0\x01\0junk", "1.0");
    let e = host.load_wasm(&m).unwrap_err();
    assert!(
        e.to_string().contains("not a valid WebAssembly component"),
        "{e}"
    );
    // A file changed after its manifest was written.
    let m = install(&dir, "faulty-patch", "f.wasm", &good, "1.0");
    std::fs::write(dir.join("f.wasm"), [&good[..], b"x"].concat()).unwrap();
    let e = host.load_wasm(&m).unwrap_err();
    assert!(matches!(e, HostError::Hash { .. }), "{e}");
    // Outside the plugin directories.
    let other = PluginHost::new(&[packed("wasm-tokenizer-patch")]);
    let e = other.load_wasm(&m).unwrap_err();
    assert!(matches!(e, HostError::OutsideDirs { .. }), "{e}");
}
