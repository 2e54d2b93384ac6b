//! Shared helpers for the workspace's golden tests: where the real models and test vectors are.

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// ../shared/models/stories260K (next to the repository), or $SWITCHYARD_STORIES.
pub fn stories_dir() -> PathBuf {
    let p = std::env::var_os("SWITCHYARD_STORIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/models/stories260K"));
    assert!(
        p.join("model.safetensors").exists(),
        "stories260K not found at {} (set SWITCHYARD_STORIES)",
        p.display()
    );
    p
}

fn cache() -> PathBuf {
    std::env::var_os("SWITCHYARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache"))
}

/// The default model; fetched by scripts/fetch-default-model.sh.
pub fn smollm2_gguf() -> PathBuf {
    let p = cache().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-test-data.sh",
        p.display()
    );
    p
}

/// llama.cpp's vocabulary test files; fetched by scripts/fetch-test-data.sh.
pub fn vocab_dir() -> PathBuf {
    let p = cache().join("vocab");
    assert!(
        p.join(".complete").exists(),
        "{} is missing: run scripts/fetch-test-data.sh",
        p.display()
    );
    p
}

pub fn load(path: &std::path::Path, threads: usize, slots: usize) -> switchyard_engine::Engine {
    let opts = switchyard_engine::EngineOptions {
        threads,
        max_slots: slots,
        ..Default::default()
    };
    switchyard_engine::Engine::load(path, opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// Python with the `openai` client, installed by scripts/fetch-test-data.sh.
/// A small story corpus sampled from stories260K itself by the `switchyard` binary `bin`
/// (seeds 1..=n, 400 tokens each), one file per story, under `dir/train` (all but the last)
/// and `dir/test` (the last).
pub fn stories_corpus(bin: &std::path::Path, dir: &std::path::Path, n: u64) {
    let stories = stories_dir();
    for sub in ["train", "test"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for seed in 1..=n {
        let out = std::process::Command::new(bin)
            .args(["generate", "--model", stories.to_str().unwrap()])
            .args(["--max-tokens", "400", "--temperature", "1", "--seed"])
            .arg(seed.to_string())
            .output()
            .expect("run switchyard");
        let text = cli::ok(&out);
        let sub = if seed == n { "test" } else { "train" };
        std::fs::write(dir.join(sub).join(format!("story{seed}.txt")), text).unwrap();
    }
}

pub fn venv_python() -> PathBuf {
    let p = cache().join("venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-test-data.sh",
        p.display()
    );
    p
}

pub mod gateway;

/// Checks of a finished `switchyard` command.
pub mod cli {
    use std::process::Output;

    /// Success; the stdout.
    pub fn ok(out: &Output) -> String {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "stderr: {err}");
        String::from_utf8(out.stdout.clone()).unwrap()
    }

    /// A clear error: exit status 1, no panic, the stderr names every needle.
    pub fn clean_error(out: &Output, needles: &[&str]) {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {err}");
        assert!(!err.contains("panicked"), "panic: {err}");
        for n in needles {
            assert!(err.contains(n), "stderr lacks {n:?}: {err}");
        }
    }
}

/// The JSON events of a server-sent-events body (`data: …` lines, `[DONE]` left out).
pub fn sse_events(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}
