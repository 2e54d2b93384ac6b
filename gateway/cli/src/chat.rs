//! `switchyard chat`: an interactive terminal chat against a running gateway (`--url`), or
//! against models served in-process (`--model PATH`, on a private loopback port). Tokens are
//! printed as they stream; the conversation is kept; /commands switch model, show the
//! pipeline and show per-turn statistics.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::blocking::Client;
use serde_json::{json, Value};

#[derive(Args)]
pub struct ChatArgs {
    /// A running gateway (default http://127.0.0.1:8080 when no --model PATH is given).
    #[arg(long)]
    url: Option<String>,
    /// Without --url: a model file or directory to serve in-process (repeatable; the first is
    /// used first). With --url: the name of the gateway's model to start with.
    #[arg(long)]
    model: Vec<String>,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Generated tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Bearer token sent with every request (for a gateway behind an authenticating proxy).
    #[arg(long)]
    api_key: Option<String>,
    /// In-process only: a directory plugins may be loaded from (repeatable).
    #[arg(long)]
    plugin_dir: Vec<PathBuf>,
    /// In-process only: cap on each model's context.
    #[arg(long)]
    max_context: Option<usize>,
}

/// One answered turn, for /stats.
struct TurnStats {
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// None without a tokenizer patch.
    saved: Option<u64>,
    ttft: Option<Duration>,
    total: Duration,
}

impl TurnStats {
    /// Decode speed: tokens after the first over the time after the first.
    fn tokens_per_sec(&self) -> Option<f64> {
        let ttft = self.ttft?;
        let rest = self.total.checked_sub(ttft)?.as_secs_f64();
        (self.completion_tokens > 1 && rest > 0.0)
            .then(|| (self.completion_tokens - 1) as f64 / rest)
    }

    fn line(&self) -> String {
        let saved = self
            .saved
            .map_or("no patch".into(), |s| format!("{s} saved"));
        let ttft = self
            .ttft
            .map_or("-".into(), |t| format!("{:.0} ms", t.as_secs_f64() * 1e3));
        let tps = self
            .tokens_per_sec()
            .map_or("-".into(), |t| format!("{t:.1} tok/s"));
        format!(
            "[{} · prompt {} · generated {} · {saved} · TTFT {ttft} · {tps} · {:.2} s]",
            self.model,
            self.prompt_tokens,
            self.completion_tokens,
            self.total.as_secs_f64()
        )
    }
}

struct Session {
    client: Client,
    base: String,
    api_key: Option<String>,
    model: String,
    system: Option<String>,
    messages: Vec<Value>,
    turns: Vec<TurnStats>,
    max_tokens: usize,
    temperature: f32,
    tty: bool,
}

const HELP: &str = "\
commands:
  /models          list the gateway's models
  /model NAME      switch to another model (the conversation is kept)
  /pipeline        show the current model's pipeline (plugins per stage)
  /stats           statistics of every turn so far
  /system TEXT     set the system message (empty: none)
  /reset           forget the conversation
  /help            this list
  /quit            leave (also Ctrl-D)";

/// True while an answer streams: Ctrl-C then stops the answer instead of the program.
static GENERATING: AtomicBool = AtomicBool::new(false);
/// Set by Ctrl-C during an answer.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C (SIGINT): during an answer, stop it (the request is dropped, so the gateway frees
/// its sequence) and return to the prompt; at the prompt, leave.
fn install_interrupt_handler() -> Result<()> {
    // SAFETY: the action only touches atomics and calls write(2) and _exit(2), all
    // async-signal-safe.
    unsafe {
        signal_hook_registry::register(libc::SIGINT, || {
            if GENERATING.load(Ordering::SeqCst) {
                INTERRUPTED.store(true, Ordering::SeqCst);
            } else {
                libc::write(1, b"\n".as_ptr().cast(), 1);
                libc::_exit(130);
            }
        })
    }
    .context("cannot install the Ctrl-C handler")?;
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let client = Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(None)
        .build()?;
    let (base, start_model) = match &a.url {
        Some(u) => (
            u.trim_end_matches('/').to_string(),
            a.model.first().cloned(),
        ),
        None if a.model.is_empty() => ("http://127.0.0.1:8080".to_string(), None),
        None => (start_in_process(&a)?, None),
    };
    let mut s = Session {
        client,
        base,
        api_key: a.api_key.clone(),
        model: String::new(),
        system: a.system.clone(),
        messages: Vec::new(),
        turns: Vec::new(),
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        // Dim statistics lines only on a terminal that shows colours (not TERM=dumb, NO_COLOR).
        tty: std::io::stdout().is_terminal()
            && std::env::var("TERM").map_or(true, |t| t != "dumb")
            && std::env::var_os("NO_COLOR").is_none(),
    };
    let models = s
        .models()
        .with_context(|| format!("cannot reach the gateway at {}", s.base))?;
    s.model = match start_model {
        Some(m) if models.iter().any(|x| x == &m) => m,
        Some(m) => bail!(
            "the gateway at {} has no model {m:?} (it has: {})",
            s.base,
            models.join(", ")
        ),
        None => models
            .first()
            .cloned()
            .with_context(|| format!("the gateway at {} serves no model", s.base))?,
    };
    install_interrupt_handler()?;
    println!(
        "switchyard chat · {} · model {} · /help for commands, /quit to leave",
        s.base, s.model
    );
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        print!("you> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            if !s.command(cmd) {
                return Ok(());
            }
            continue;
        }
        s.turn(line);
    }
}

/// Serve the `--model` paths in-process on a private loopback port; returns its base URL
/// once every model is ready.
fn start_in_process(a: &ChatArgs) -> Result<String> {
    use switchyard_server::config::{GatewayConfig, Overrides};
    let mut paths = Vec::new();
    for m in &a.model {
        let p = PathBuf::from(m);
        if !p.exists() {
            bail!("--model {m}: no such file or directory (use --url to chat with a running gateway's model by name)");
        }
        paths.push(p);
    }
    let ov = Overrides {
        host: Some("127.0.0.1".into()),
        port: Some(0),
        models: paths,
        max_context: a.max_context,
        plugin_dirs: a.plugin_dir.clone(),
        ..Default::default()
    };
    let cfg = GatewayConfig::load(&ov, None)?;
    let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(switchyard_server::serve_notify(
                cfg,
                Some(tx),
                false,
            ))
        })?;
    let addrs = match rx.recv() {
        Ok(a) => a,
        Err(_) => {
            return Err(match server.join() {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the in-process gateway did not start"),
            })
        }
    };
    let base = format!("http://{}", addrs.first().context("no listening address")?);
    eprint!("loading {} ...", names.join(", "));
    let c = Client::new();
    let t0 = Instant::now();
    loop {
        if server.is_finished() {
            eprintln!();
            return Err(match server.join() {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the in-process gateway stopped"),
            });
        }
        // /health is 200 once every model is loaded.
        if c.get(format!("{base}/health"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            eprintln!(" ready in {:.1} s", t0.elapsed().as_secs_f64());
            return Ok(base);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Session {
    fn get(&self, path: &str) -> Result<Value> {
        let mut r = self.client.get(format!("{}{path}", self.base));
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        let r = r.send()?;
        let status = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{}", error_message(status.as_u16(), &v));
        }
        Ok(v)
    }

    fn models(&self) -> Result<Vec<String>> {
        let v = self.get("/v1/models")?;
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Run one /command; false to leave.
    fn command(&mut self, cmd: &str) -> bool {
        let (name, arg) = cmd
            .split_once(char::is_whitespace)
            .map_or((cmd, ""), |(n, a)| (n, a.trim()));
        match name {
            "quit" | "exit" | "q" => return false,
            "help" | "?" => println!("{HELP}"),
            "reset" => {
                self.messages.clear();
                println!("conversation cleared");
            }
            "system" => {
                self.system = (!arg.is_empty()).then(|| arg.to_string());
                match &self.system {
                    Some(s) => println!("system message set ({} chars)", s.len()),
                    None => println!("system message removed"),
                }
            }
            "models" => match self.get("/v1/models") {
                Ok(v) => {
                    for m in v["data"].as_array().into_iter().flatten() {
                        let id = m["id"].as_str().unwrap_or("?");
                        let mark = if id == self.model { "*" } else { " " };
                        let state = if m["ready"] == true {
                            "ready"
                        } else {
                            "loading"
                        };
                        println!("{mark} {id} ({state}, context {})", m["max_model_len"]);
                    }
                }
                Err(e) => println!("error: {e:#}"),
            },
            "model" => {
                if arg.is_empty() {
                    println!("model: {} (/model NAME switches)", self.model);
                    return true;
                }
                match self.get(&format!("/v1/models/{arg}")) {
                    Ok(v) if v["ready"] == true => {
                        self.model = arg.to_string();
                        println!("switched to {arg}");
                    }
                    Ok(_) => println!("error: model {arg} is still loading"),
                    Err(e) => println!("error: {e:#}"),
                }
            }
            "pipeline" => match self.get(&format!("/v1/models/{}", self.model)) {
                Ok(v) => {
                    let p = &v["pipeline"];
                    println!("{} · pipeline generation {}", self.model, p["generation"]);
                    for pl in p["plugins"].as_array().into_iter().flatten() {
                        println!(
                            "  {:<16} {} {} ({})",
                            pl["stage"].as_str().unwrap_or("?"),
                            pl["name"].as_str().unwrap_or("?"),
                            pl["version"].as_str().unwrap_or(""),
                            pl["kind"].as_str().unwrap_or("?"),
                        );
                    }
                }
                Err(e) => println!("error: {e:#}"),
            },
            "stats" => {
                if self.turns.is_empty() {
                    println!("no turns yet");
                }
                for (i, t) in self.turns.iter().enumerate() {
                    println!("turn {}: {}", i + 1, t.line());
                }
                let (p, c): (u64, u64) = self.turns.iter().fold((0, 0), |(p, c), t| {
                    (p + t.prompt_tokens, c + t.completion_tokens)
                });
                if !self.turns.is_empty() {
                    println!("total: prompt {p} · generated {c}");
                }
            }
            _ => println!("unknown command /{name} (/help lists them)"),
        }
        true
    }

    /// Send the conversation plus `text`, stream the answer, keep both on success.
    fn turn(&mut self, text: &str) {
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.extend(self.messages.iter().cloned());
        msgs.push(json!({"role": "user", "content": text}));
        let body = json!({
            "model": self.model,
            "messages": msgs,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        print!("{}> ", self.model);
        let _ = std::io::stdout().flush();
        match self.stream(&body) {
            Ok((answer, stats)) => {
                println!();
                let line = stats.line();
                if self.tty {
                    println!("\x1b[2m{line}\x1b[0m");
                } else {
                    println!("{line}");
                }
                self.messages.push(json!({"role": "user", "content": text}));
                self.messages
                    .push(json!({"role": "assistant", "content": answer}));
                self.turns.push(stats);
            }
            Err(e) => {
                println!();
                println!("error: {e:#}");
            }
        }
    }

    fn stream(&self, body: &Value) -> Result<(String, TurnStats)> {
        let t0 = Instant::now();
        let mut r = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(body);
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        let r = r.send().context("request failed")?;
        let status = r.status();
        if !status.is_success() {
            let v: Value = r.json().unwrap_or(Value::Null);
            bail!("{}", error_message(status.as_u16(), &v));
        }
        let mut answer = String::new();
        let mut ttft = None;
        let mut usage = Value::Null;
        let mut done = false;
        let mut interrupted = false;
        let mut chunks = 0u64;
        let mut out = std::io::stdout();
        INTERRUPTED.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let _generating = Generating;
        for line in std::io::BufReader::new(r).lines() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let line = line.context("the stream broke")?;
            let Some(d) = line.strip_prefix("data: ") else {
                continue;
            };
            if d == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(d).context("a stream event is not JSON")?;
            if v.get("error").is_some() {
                bail!("{}", error_message(500, &v));
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                if ttft.is_none() && !t.is_empty() {
                    ttft = Some(t0.elapsed());
                }
                answer.push_str(t);
                chunks += u64::from(!t.is_empty());
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            }
        }
        if interrupted {
            // Dropping the response closes the connection: the gateway cancels the sequence.
            let _ = out.write_all(b" [interrupted]");
            let _ = out.flush();
        } else if !done {
            bail!("the stream ended before [DONE]");
        }
        // Without usage (interrupted), the text's chunks estimate the generated tokens.
        let saved = usage
            .get("tokens_saved")
            .map(|s| s["prompt"].as_u64().unwrap_or(0) + s["completion"].as_u64().unwrap_or(0));
        Ok((
            answer,
            TurnStats {
                model: self.model.clone(),
                prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(chunks),
                saved,
                ttft,
                total: t0.elapsed(),
            },
        ))
    }
}

/// Clears GENERATING when an answer ends, however it ends.
struct Generating;

impl Drop for Generating {
    fn drop(&mut self) {
        GENERATING.store(false, Ordering::SeqCst);
    }
}

/// The message of an OpenAI-style error body, with its status.
fn error_message(status: u16, v: &Value) -> String {
    match v["error"]["message"].as_str() {
        Some(m) => format!("{m} (HTTP {status})"),
        None => format!("HTTP {status}"),
    }
}
