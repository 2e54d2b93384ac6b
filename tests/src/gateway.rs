//! A real `switchyard serve` process on a free loopback port, for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    /// Start `bin serve --port 0 ARGS` with extra environment; returns once it listens.
    pub fn start(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start switchyard serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    // (a plain or a JSON log line: the address ends at a space or quote)
                    let addr: String = line[i + "listening on ".len()..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    let _ = tx.send(addr);
                }
                l2.lock().unwrap().push(line);
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start listening:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Gateway { child, base, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Wait until /health says 200.
    pub fn wait_ready(&self) {
        let c = reqwest::blocking::Client::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = c.get(self.url("/health")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway not ready after 60 s:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit (up to `secs`).
    pub fn wait_exit(&mut self, secs: u64) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The value of one Prometheus series (exact name with labels), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let body = reqwest::blocking::get(self.url("/metrics"))
            .and_then(|r| r.text())
            .unwrap_or_default();
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugin directory with the kv-allocator plugins kv-heap, kv-static, vattention and the
/// test plugin faulty-kv, the linear-kernels plugin larosa (built by `cargo build
/// --workspace` next to `bin`), and the faulty-patch and adaptivocab WebAssembly guests
/// (built by scripts/build-wasm-plugins.sh).
pub fn plugin_dir(bin: &Path, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sy-plugins-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let target = bin.parent().unwrap();
    for (lib, plugin, kind) in [
        ("libswitchyard_kv_heap.so", "kv-heap", "kv-allocator"),
        (
            "libswitchyard_test_faulty_kv.so",
            "faulty-kv",
            "kv-allocator",
        ),
        ("libswitchyard_kv_static.so", "kv-static", "kv-allocator"),
        ("libswitchyard_vattention.so", "vattention", "kv-allocator"),
        ("libswitchyard_larosa.so", "larosa", "linear-kernels"),
    ] {
        let src = target.join(lib);
        assert!(
            src.exists(),
            "{} missing: cargo build --workspace first",
            src.display()
        );
        std::fs::copy(&src, d.join(lib)).unwrap();
        let sha = switchyard_plugin_host::sha256_file(&d.join(lib)).unwrap();
        std::fs::write(
            d.join(format!("{plugin}.toml")),
            format!(
                "name = \"{plugin}\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\nabi = \"1.1\"\nfile = \"{lib}\"\nsha256 = \"{sha}\"\n"
            ),
        )
        .unwrap();
    }
    for (guest, f) in [
        ("faulty-patch", "faulty-patch.wasm"),
        ("faulty-patch", "faulty-patch.toml"),
        ("adaptivocab", "adaptivocab.wasm"),
        ("adaptivocab", "adaptivocab.toml"),
    ] {
        let src = crate::root()
            .join("target/wasm-plugins")
            .join(guest)
            .join(f);
        assert!(
            src.exists(),
            "{} missing: run scripts/build-wasm-plugins.sh first",
            src.display()
        );
        std::fs::copy(&src, d.join(f)).unwrap();
    }
    d
}

impl Gateway {
    /// stories260K served with the plugins of `plugin_dir` and the admin API enabled by
    /// `token` (plus `extra` flags and environment); returns once it is ready.
    pub fn stories_with_plugins(
        bin: &Path,
        plugin_dir: &Path,
        token: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Gateway {
        let stories = crate::stories_dir();
        let mut args = vec![
            "--model",
            stories.to_str().unwrap(),
            "--plugin-dir",
            plugin_dir.to_str().unwrap(),
            "--admin-token",
            token,
        ];
        args.extend_from_slice(extra);
        let gw = Gateway::start(bin, &args, env);
        gw.wait_ready();
        gw
    }

    /// An admin API call (`token` as bearer); status and JSON body.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let c = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let mut r = match method {
            "GET" => c.get(self.url(path)),
            "PUT" => c.put(self.url(path)),
            _ => c.post(self.url(path)),
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().unwrap();
        let s = r.status().as_u16();
        (s, r.json().unwrap_or(serde_json::Value::Null))
    }
}
