//! Native plugins through the host: the built-in kv-heap plugin runs the real model with the
//! same greedy output as the engine's own allocator; bad plugins are refused with clear errors.
//! The plugin libraries are built by `cargo build --workspace` (scripts/test.sh does it first).

use std::path::{Path, PathBuf};

use switchyard_engine::sampling::SamplingParams;
use switchyard_engine::GenerateRequest;
use switchyard_plugin_host::{sha256_file, PluginHost};

/// target/<profile>/ (the test binary lives in target/<profile>/deps/).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn library(crate_name: &str) -> PathBuf {
    let p = target_dir().join(format!("lib{}.so", crate_name.replace('-', "_")));
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-host-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copy `lib` into `dir` with a manifest; returns the manifest path.
fn install(
    dir: &Path,
    lib: &Path,
    name: &str,
    kind: &str,
    abi: &str,
    sha: Option<&str>,
) -> PathBuf {
    let file = lib.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::copy(lib, dir.join(&file)).unwrap();
    let sha = sha.map_or_else(|| sha256_file(&dir.join(&file)).unwrap(), str::to_string);
    let m = dir.join(format!("{name}.toml"));
    std::fs::write(
        &m,
        format!(
            "name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\nabi = \"{abi}\"\nfile = \"{file}\"\nsha256 = \"{sha}\"\n"
        ),
    )
    .unwrap();
    m
}

fn greedy(engine: &mut switchyard_engine::Engine) -> Vec<u32> {
    let req = GenerateRequest {
        prompt: engine.encode_prompt("Once upon a time").unwrap(),
        max_tokens: 120,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    engine.generate(&req, &mut |_| {}).unwrap().tokens
}

/// stories260K with `p`'s KV allocator, after checking that its greedy text equals the
/// builtin allocator's.
fn engine_with_plugin_kv(p: &switchyard_plugin_host::NativePlugin) -> switchyard_engine::Engine {
    let stories = switchyard_tests::stories_dir();
    let mut builtin = switchyard_tests::load(&stories, 1, 2);
    let want = greedy(&mut builtin);
    let mut e = switchyard_tests::load(&stories, 1, 2);
    let kv = p.kv_allocator("", e.kv_layout(2)).unwrap();
    e.set_kv(Box::new(kv));
    assert_eq!(greedy(&mut e), want);
    e
}

#[test]
fn kv_heap_plugin_matches_the_builtin_allocator() {
    let dir = tmpdir("heap");
    let m = install(
        &dir,
        &library("switchyard-kv-heap"),
        "kv-heap",
        "kv-allocator",
        "1.1",
        None,
    );
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let p = host.load_native(&m).unwrap();
    assert_eq!((p.name.as_str(), p.abi), ("kv-heap", (1, 1)));
    assert_eq!(
        p.sha256,
        sha256_file(&dir.join("libswitchyard_kv_heap.so")).unwrap()
    );

    let e = engine_with_plugin_kv(&p);
    assert_eq!(e.kv.name(), "kv-heap");
    assert_eq!(e.kv.stats().slots_in_use, 0);

    // Configuration errors come back as messages.
    let err = p
        .kv_allocator("pages = 4", e.kv_layout(2))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("kv-heap takes no configuration"), "{err}");
}

#[test]
fn bad_plugins_are_refused_with_clear_errors() {
    let dir = tmpdir("bad");
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let heap = library("switchyard-kv-heap");

    // sha256 differs from the manifest.
    let m = install(
        &dir,
        &heap,
        "kv-heap",
        "kv-allocator",
        "1.1",
        Some(&"0".repeat(64)),
    );
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(
        e.contains("sha256 is") && e.contains("manifest says"),
        "{e}"
    );

    // The manifest promises another kind.
    let m = install(&dir, &heap, "kv-heap", "linear-kernels", "1.1", None);
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(
        e.contains("kv-allocator plugin, the manifest says linear-kernels"),
        "{e}"
    );

    // ABI major mismatch.
    let m = install(
        &dir,
        &library("switchyard-test-abi-v2"),
        "abi-v2",
        "kv-allocator",
        "2.0",
        None,
    );
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(
        e.contains("ABI 2.0 is incompatible") && e.contains("majors differ"),
        "{e}"
    );

    // No root symbol: a shared library that is not a Switchyard plugin.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libm.so.6");
    let m = install(&dir, &libm, "libm", "kv-allocator", "1.1", None);
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(e.contains("no root symbol `switchyard_plugin_v1`"), "{e}");

    // Outside the plugin directories: the manifest itself, or a file reached through "..".
    let elsewhere = tmpdir("elsewhere");
    let m = install(&elsewhere, &heap, "kv-heap", "kv-allocator", "1.1", None);
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(e.contains("outside the plugin directories"), "{e}");
    let sha = sha256_file(&heap).unwrap();
    let escape = dir.join("escape.toml");
    std::fs::write(
        &escape,
        format!(
            "name = \"kv-heap\"\nversion = \"0.1.0\"\nkind = \"kv-allocator\"\nabi = \"1.1\"\nfile = \"../sy-host-{}-elsewhere/libswitchyard_kv_heap.so\"\nsha256 = \"{sha}\"\n",
            std::process::id()
        ),
    )
    .unwrap();
    let e = host.load_native(&escape).unwrap_err().to_string();
    assert!(e.contains("outside the plugin directories"), "{e}");
}

#[test]
fn plugin_errors_and_panics_stop_at_the_boundary() {
    let dir = tmpdir("faulty");
    let m = install(
        &dir,
        &library("switchyard-test-faulty-kv"),
        "faulty-kv",
        "kv-allocator",
        "1.1",
        None,
    );
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let p = host.load_native(&m).unwrap();
    let layout = switchyard_engine::kv::KvLayout {
        n_layers: 1,
        kv_heads: 1,
        head_dim: 8,
        max_context: 16,
        max_slots: 1,
    };
    let e = p.kv_allocator("error", layout).err().unwrap().to_string();
    assert!(e.contains("faulty-kv failed: refusing to start"), "{e}");
    let e = p.kv_allocator("panic", layout).err().unwrap().to_string();
    assert!(e.contains("panicked: deliberate panic in create"), "{e}");
    use switchyard_engine::kv::KvAllocator;
    let mut kv = p.kv_allocator("panic-acquire", layout).unwrap();
    let e = kv.acquire().unwrap_err().to_string();
    assert!(e.contains("panicked: deliberate panic in acquire"), "{e}");
    let mut kv = p.kv_allocator("", layout).unwrap();
    let e = kv.acquire().unwrap_err().to_string();
    assert!(e.contains("out of capacity: no slots, ever"), "{e}");
}

#[test]
fn linear_kernels_and_model_transform_plugins_run_through_the_host() {
    let dir = tmpdir("kinds");
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let m = install(
        &dir,
        &library("switchyard-linear-dense"),
        "linear-dense",
        "linear-kernels",
        "1.1",
        None,
    );
    let p = host.load_native(&m).unwrap();
    // The wrong kind is refused by name.
    let e = p
        .kv_allocator(
            "",
            switchyard_engine::kv::KvLayout {
                n_layers: 1,
                kv_heads: 1,
                head_dim: 1,
                max_context: 1,
                max_slots: 1,
            },
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a kv-allocator"), "{e}");
    let e = p.linear_kernels("x = 1").err().unwrap();
    assert!(e.to_string().contains("takes no configuration"), "{e}");
    let mut k = p.linear_kernels("").unwrap();
    let (n, inp, out) = (3, 70, 33);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..n * inp)
        .map(|i| ((i * 104729) % 300) as f32 / 150.0 - 1.0)
        .collect();
    k.prepare(5, &w, out, inp).unwrap();
    let mut y = vec![0f32; n * out];
    k.linear(5, &x, n, inp, &mut y, out).unwrap();
    for r in 0..n {
        for o in 0..out {
            let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
            assert!((y[r * out + o] - want).abs() < 1e-3, "{r},{o}");
        }
    }
    let e = k.linear(6, &x, n, inp, &mut y, out).unwrap_err();
    assert!(e.to_string().contains("was not prepared"), "{e}");

    let m = install(
        &dir,
        &library("switchyard-transform-identity"),
        "transform-identity",
        "model-transform",
        "1.1",
        None,
    );
    let p = host.load_native(&m).unwrap();
    let mut t = p.model_transform("").unwrap();
    let model = r#"{"config": {"n_layers": 1}, "tensors": [{"name": "a", "dtype": "F32", "shape": [2, 3]}]}"#;
    let plan: serde_json::Value = serde_json::from_str(&t.plan(model).unwrap()).unwrap();
    assert_eq!(plan["config"]["n_layers"], 1);
    assert_eq!(plan["tensors"][0]["sources"][0], "a");
    let src = [1f32, 2., 3., 4., 5., 6.];
    let mut out = [0f32; 6];
    t.produce(0, &[(&src, &[2, 3])], &mut out, &[2, 3]).unwrap();
    assert_eq!(out, src);
    let e = t.plan("not json").unwrap_err();
    assert!(e.to_string().contains("model description"), "{e}");
}

#[test]
fn vattention_and_static_allocators_give_the_reference_greedy_text() {
    // The reference: llama2.c's 200 greedy tokens from BOS. Every allocator (and vAttention
    // in several configurations: 4 KiB pages so a sequence crosses ~30 of them, mapping ahead
    // on the thread or inline, no prefault, pages kept or returned) must give exactly them.
    let dir = tmpdir("vattn");
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let vm = install(
        &dir,
        &library("switchyard-vattention"),
        "vattention",
        "kv-allocator",
        "1.1",
        None,
    );
    let sm = install(
        &dir,
        &library("switchyard-kv-static"),
        "kv-static",
        "kv-allocator",
        "1.1",
        None,
    );
    let stories = switchyard_tests::stories_dir();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories.join("reference_greedy.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> = want["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let run = |kv: Option<Box<dyn switchyard_engine::kv::KvAllocator>>| {
        let mut e = switchyard_tests::load(&stories, 1, 2);
        if let Some(kv) = kv {
            e.set_kv(kv);
        }
        let req = GenerateRequest {
            prompt: vec![1],
            max_tokens: 200,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let out = e.generate(&req, &mut |_| {}).unwrap().tokens;
        assert_eq!(e.kv.stats().slots_in_use, 0);
        out
    };
    assert_eq!(run(None), want, "builtin heap allocator");
    let layout = switchyard_tests::load(&stories, 1, 2).kv_layout(2);
    let sp = host.load_native(&sm).unwrap();
    assert_eq!(
        run(Some(Box::new(sp.kv_allocator("", layout).unwrap()))),
        want,
        "kv-static"
    );
    let vp = host.load_native(&vm).unwrap();
    for cfg in [
        "",
        "page_kb = 4",
        "page_kb = 4\nahead_pages = 0",
        "page_kb = 4\nbackground = false\nprefault = false",
        "page_kb = 4\nretain_pages = 0\nbudget_mb = 1",
        "page_kb = 2048",
    ] {
        let kv = vp.kv_allocator(cfg, layout).unwrap();
        assert_eq!(kv.name(), "vattention");
        assert_eq!(run(Some(Box::new(kv))), want, "vattention {cfg:?}");
    }
    // Page counters cross the ABI (1.1): vAttention reports them, kv-static has none.
    let mut kv = vp
        .kv_allocator("page_kb = 4\nbackground = false\nahead_pages = 0", layout)
        .unwrap();
    use switchyard_engine::kv::KvAllocator;
    let s = kv.acquire().unwrap();
    kv.ensure(s, 100).unwrap();
    let p = kv.stats().pages.expect("vattention reports page counters");
    let per_page_set = 2 * layout.n_layers as u64;
    let tok_bytes = (layout.token_elems() * 4) as u64;
    assert_eq!(p.page_bytes, 4096);
    assert_eq!(p.mapped, (100 * tok_bytes).div_ceil(4096) * per_page_set);
    assert_eq!(p.sync_maps, 1);
    assert!(p.sync_map_ns > 0);
    let skv = sp.kv_allocator("", layout).unwrap();
    assert_eq!(skv.stats().pages, None, "kv-static does not page");
    let e = vp
        .kv_allocator("page_kb = 3", layout)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("power of two"), "{e}");
}

/// A plugin built against ABI 1.0 (vtable without `page_stats`) loads in this 1.1 host,
/// gives the same text as the builtin allocator, and reports no page counters.
#[test]
fn abi_1_0_plugins_still_load() {
    let lib = library("switchyard-test-abi-1-0");
    // Its manifest must say what the library says: 1.0, not this host's 1.1. (A separate
    // directory each time: a loaded library must not be overwritten in place.)
    let bad = tmpdir("abi10-bad");
    let host = PluginHost::new(std::slice::from_ref(&bad));
    let m = install(&bad, &lib, "kv-abi-1-0", "kv-allocator", "1.1", None);
    let e = host.load_native(&m).unwrap_err().to_string();
    assert!(e.contains("built for ABI 1.0"), "{e}");
    let dir = tmpdir("abi10");
    let host = PluginHost::new(std::slice::from_ref(&dir));
    let m = install(&dir, &lib, "kv-abi-1-0", "kv-allocator", "1.0", None);
    let p = host.load_native(&m).unwrap();
    assert_eq!(p.abi, (1, 0));

    let e = engine_with_plugin_kv(&p);
    assert_eq!(e.kv.stats().pages, None);
}
