//! The plugin templates, built the way docs/writing-a-plugin.md says (their own cargo builds
//! and tests, the WebAssembly build script, `switchyard plugin pack`), load into a running
//! gateway and serve.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::blocking::Client;
use serde_json::{json, Value};
use switchyard_tests::gateway::Gateway;

const TOKEN: &str = "template-token";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn completion(c: &Client, gw: &Gateway) -> (String, String) {
    let r = c
        .post(gw.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let g = r.headers()["x-switchyard-generation"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = r.json().unwrap();
    (v["choices"][0]["text"].as_str().unwrap().to_string(), g)
}

#[test]
fn templates_build_pack_load_and_serve() {
    let root = switchyard_tests::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let native = root.join("sdk/template/native-kv-allocator");
    let target = root.join("target/templates");
    // The native template: its own tests (conformance suite), then the library.
    run(Command::new(&cargo)
        .args(["test", "--release", "--quiet"])
        .current_dir(&native)
        .env("CARGO_TARGET_DIR", &target));
    run(Command::new(&cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(&native)
        .env("CARGO_TARGET_DIR", &target));
    // The WebAssembly template through the repository's build script.
    run(Command::new(root.join("scripts/build-wasm-plugins.sh"))
        .arg("sdk/template/wasm-tokenizer-patch")
        .current_dir(&root));

    let dir: PathBuf = std::env::temp_dir().join(format!("sy-templates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let so = target.join("release/libstatic_kv.so");
    let wasm = root.join("target/wasm-plugins/wasm-tokenizer-patch/pair-merge-patch.wasm");
    let out = run(Command::new(bin())
        .args(["plugin", "pack"])
        .arg(&so)
        .arg("--out")
        .arg(&dir));
    assert!(
        out.contains("packed static-kv 0.1.0 (kv-allocator, ABI 1.1)"),
        "{out}"
    );
    let out = run(Command::new(bin())
        .args(["plugin", "pack"])
        .arg(&wasm)
        .arg("--out")
        .arg(&dir));
    assert!(
        out.contains("packed pair-merge-patch 0.1.0 (tokenizer-patch, ABI 1.0)"),
        "{out}"
    );
    // A file that is not a plugin gets a clear error naming it.
    let junk = dir.join("junk.so");
    std::fs::write(&junk, b"not a library").unwrap();
    let o = Command::new(bin())
        .args(["plugin", "pack"])
        .arg(&junk)
        .arg("--out")
        .arg(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("junk.so"));
    std::fs::remove_file(&junk).unwrap();

    let gw = Gateway::stories_with_plugins(bin(), &dir, TOKEN, &[], &[]);
    let c = Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (base, g) = completion(&c, &gw);
    assert_eq!(g, "1");
    let v: Value = c
        .get(gw.url("/admin/plugins"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let names: Vec<&str> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pair-merge-patch", "static-kv"]);

    let put = |body: Value| {
        let r = c
            .put(gw.url("/admin/models/stories260K/pipeline"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (s, v) = put(json!({
        "kv_allocator": {"plugin": "static-kv", "config": "max_slots = 4"},
        "tokenizer_patch": {"plugin": "pair-merge-patch", "config": "vocab 512"}
    }));
    assert_eq!(s, 200, "{v}");
    let (text, g) = completion(&c, &gw);
    assert_eq!(g, v["generation"].to_string());
    assert_eq!(
        text, base,
        "the identity patch and static allocator change nothing"
    );
    // Pairs add ids the model cannot read: refused, the old generation keeps serving.
    let (s, v) = put(json!({
        "tokenizer_patch": {"plugin": "pair-merge-patch", "config": "vocab 512\npair 1 2"}
    }));
    assert_eq!(s, 422, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("needs the patched model"), "{msg}");
    // A configuration the template rejects.
    let (s, v) = put(json!({"kv_allocator": {"plugin": "static-kv", "config": "slots = 2"}}));
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown key"));
    let _ = std::fs::remove_dir_all(&dir);
}
