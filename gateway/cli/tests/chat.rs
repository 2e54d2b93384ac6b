//! `switchyard chat` driven like a person would: through a real pseudo-terminal, against a
//! real gateway on a loopback port (and once with the models served in-process).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_tests::gateway::Gateway;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-chat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A child process on the slave side of a pseudo-terminal; everything it prints is collected
/// from the master side (with the terminal's \r\n turned back into \n).
struct PtyChild {
    child: std::process::Child,
    master: std::fs::File,
    out: Arc<Mutex<String>>,
    /// How much of `out` earlier `expect` calls consumed.
    seen: usize,
}

impl PtyChild {
    fn spawn(args: &[&str]) -> PtyChild {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two new descriptors into m and s; the null pointers mean
        // no name, default termios and window size.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty failed");
        // SAFETY: both descriptors were just opened and are owned by nobody else.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let child = Command::new(bin())
            .arg("chat")
            .args(args)
            .env("TERM", "dumb")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let o2 = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Reading fails (EIO) once the child has exited and the slave is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]).replace("\r\n", "\n"));
            }
        });
        PtyChild {
            child,
            master,
            out,
            seen: 0,
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\n").unwrap();
    }

    /// Wait until the output after what was already seen contains `needle`; returns that
    /// new output up to and including the needle.
    fn expect(&mut self, needle: &str) -> String {
        let t0 = Instant::now();
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out[self.seen..].find(needle) {
                    let end = self.seen + i + needle.len();
                    let got = out[self.seen..end].to_string();
                    self.seen = end;
                    return got;
                }
            }
            if t0.elapsed() > Duration::from_secs(120) {
                panic!(
                    "no {needle:?} in the chat's output:\n{}",
                    &self.out.lock().unwrap()[self.seen..]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "chat did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway's own non-streamed answer to `messages` (greedy).
fn answer(gw: &Gateway, model: &str, messages: &Value, max_tokens: u64) -> Value {
    reqwest::blocking::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(
            &json!({"model": model, "messages": messages, "temperature": 0,
                      "max_tokens": max_tokens}),
        )
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// The number after `key ` in a stats line.
fn stat(line: &str, key: &str) -> u64 {
    let i = line.find(&format!("{key} ")).unwrap() + key.len() + 1;
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn chat_in_a_terminal_streams_keeps_the_conversation_and_switches_models() {
    let dir = tmpdir("pty");
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[models]]\nname = \"stories\"\npath = {:?}\n\n\
             [[models]]\nname = \"smol\"\npath = {:?}\nmax_context = 2048\n",
            switchyard_tests::stories_dir().display().to_string(),
            switchyard_tests::smollm2_gguf().display().to_string(),
        ),
    )
    .unwrap();
    let gw = Gateway::start(bin(), &["--config", cfg.to_str().unwrap()], &[]);
    gw.wait_ready();

    let mut c = PtyChild::spawn(&[
        "--url",
        &gw.base,
        "--model",
        "stories",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
    ]);
    let banner = c.expect("you> ");
    assert!(banner.contains("model stories"), "{banner}");

    // Turn 1 on stories260K: the streamed answer is the gateway's greedy answer.
    c.type_line("Once upon a time");
    let got = c.expect("\n[stories · ");
    let want = answer(
        &gw,
        "stories",
        &json!([{"role": "user", "content": "Once upon a time"}]),
        20,
    );
    let want_text = want["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!want_text.is_empty());
    assert!(
        got.contains(&format!("stories> {want_text}\n")),
        "streamed {got:?}, want {want_text:?}"
    );
    let stats1 = c.expect("]");
    assert_eq!(
        stat(&stats1, "generated"),
        want["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(
        stats1.contains("no patch") && stats1.contains("TTFT"),
        "{stats1}"
    );

    // Switch model; the conversation goes along.
    c.expect("you> ");
    c.type_line("/model smol");
    c.expect("switched to smol");
    c.expect("you> ");
    c.type_line("/pipeline");
    let p = c.expect("you> ");
    assert!(
        p.contains("smol · pipeline generation 1") && p.contains("kv_allocator"),
        "{p}"
    );
    c.type_line("/model nope");
    let e = c.expect("you> ");
    assert!(e.contains("error:") && e.contains("nope"), "{e}");

    c.type_line("What is the capital of France? Answer in one word.");
    let got = c.expect("\n[smol · ");
    let history = json!([
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": want_text},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ]);
    let want2 = answer(&gw, "smol", &history, 20);
    let want2_text = want2["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        got.contains(&format!("smol> {want2_text}\n")),
        "streamed {got:?}, want {want2_text:?} (the whole conversation)"
    );
    let stats2 = c.expect("]");
    assert_eq!(
        stat(&stats2, "prompt"),
        want2["usage"]["prompt_tokens"].as_u64().unwrap()
    );

    c.expect("you> ");
    c.type_line("/stats");
    let s = c.expect("you> ");
    assert!(
        s.contains("turn 1: [stories") && s.contains("turn 2: [smol") && s.contains("total:"),
        "{s}"
    );
    c.type_line("/reset");
    c.expect("conversation cleared");
    c.expect("you> ");
    c.type_line("/quit");
    assert!(c.wait().success());

    // Ctrl-C during a long answer stops that answer (the gateway cancels the sequence) and
    // the chat goes on; Ctrl-C at the prompt leaves with status 130.
    let mut c = PtyChild::spawn(&["--url", &gw.base, "--model", "smol", "--max-tokens", "1500"]);
    c.expect("you> ");
    c.type_line("Write a very long story about a dragon who learns to cook.");
    c.expect("smol> ");
    // Wait for some text, then interrupt.
    let t0 = Instant::now();
    loop {
        let n = c.out.lock().unwrap()[c.seen..].len();
        if n > 40 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no answer text");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancelled = r#"switchyard_requests_total{model="smol",outcome="cancelled"}"#;
    let before = gw.metric(cancelled);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(c.child.id() as i32, libc::SIGINT) }, 0);
    let stats = c.expect("[interrupted]\n");
    assert!(!stats.contains("error"), "{stats}");
    c.expect("you> ");
    let t0 = Instant::now();
    while gw.metric(cancelled) < before + 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the gateway did not see the cancellation"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.type_line("/stats");
    c.expect("turn 1: [smol");
    c.expect("you> ");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(c.child.id() as i32, libc::SIGINT) }, 0);
    assert_eq!(c.wait().code(), Some(130));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_serves_a_model_in_process_and_refuses_bad_arguments() {
    let stories = switchyard_tests::stories_dir();
    let out = Command::new(bin())
        .args(["chat", "--temperature", "0", "--max-tokens", "8", "--model"])
        .arg(&stories)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            ch.stdin
                .take()
                .unwrap()
                .write_all(b"Once upon a time\n/stats\n")?;
            ch.wait_with_output()
        })
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("ready in"), "{stderr}");
    assert!(
        stdout.contains("stories260K> ") && stdout.contains("turn 1: [stories260K · prompt"),
        "{stdout}"
    );

    // Bad arguments: exit status 1 and stderr saying what is wrong.
    let fails = |args: &[&str]| -> String {
        let out = Command::new(bin())
            .arg("chat")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = fails(&["--model", "/no/such/model.gguf"]);
    assert!(
        err.contains("/no/such/model.gguf") && err.contains("no such file"),
        "{err}"
    );
    let err = fails(&["--url", "http://127.0.0.1:9"]);
    assert!(
        err.contains("cannot reach the gateway at http://127.0.0.1:9"),
        "{err}"
    );
}
