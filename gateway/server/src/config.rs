//! Gateway configuration: built-in defaults, then a TOML file, then `SWITCHYARD_SERVER__*`
//! environment variables, then command-line flags; validated into [`GatewayConfig`].
//!
//! ```toml
//! [server]
//! host = "127.0.0.1"
//! port = 8080
//! admin_token = "secret"          # optional; enables the admin API
//! max_body_bytes = 4194304
//! shutdown_timeout_secs = 30
//! log_json = false
//! plugin_dirs = ["plugins-enabled"]  # where plugins may be loaded from
//! wasm_call_deadline_ms = 1000    # longest one WebAssembly plugin call may run
//! wasm_max_memory_mb = 256        # memory cap of one WebAssembly plugin instance
//!
//! [[models]]
//! name = "smollm2"
//! path = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! max_context = 2048              # optional cap on the model's context
//! max_batch = 8                   # sequences decoded together
//! step_tokens = 256               # token budget of one forward pass
//! max_waiting = 256               # queue bound; more requests get 429
//! threads = 0                     # 0 = all cores
//! default_max_tokens = 512        # optional; unset = the rest of the context
//! default_temperature = 1.0
//! default_top_p = 1.0
//! default_top_k = 0
//! device = "cpu"                  # or "cuda" / "cuda:N" (falls back to the CPU if unusable)
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub admin_token: Option<String>,
    pub max_body_bytes: usize,
    pub shutdown_timeout_secs: u64,
    pub log_json: bool,
    /// HTTP worker threads (0 = min(cores, 4)).
    pub workers: usize,
    /// Directories plugins may be loaded from (their `*.toml` manifests).
    pub plugin_dirs: Vec<PathBuf>,
    /// Deadline of one WebAssembly plugin call, milliseconds.
    pub wasm_call_deadline_ms: u64,
    /// Memory cap of one WebAssembly plugin instance, MiB.
    pub wasm_max_memory_mb: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            admin_token: None,
            max_body_bytes: 4 << 20,
            shutdown_timeout_secs: 30,
            log_json: false,
            workers: 0,
            plugin_dirs: Vec::new(),
            wasm_call_deadline_ms: 1000,
            wasm_max_memory_mb: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub max_context: Option<usize>,
    #[serde(default = "d_max_batch")]
    pub max_batch: usize,
    #[serde(default = "d_step_tokens")]
    pub step_tokens: usize,
    #[serde(default = "d_max_waiting")]
    pub max_waiting: usize,
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub default_max_tokens: Option<usize>,
    #[serde(default = "d_temperature")]
    pub default_temperature: f32,
    #[serde(default = "d_top_p")]
    pub default_top_p: f32,
    #[serde(default)]
    pub default_top_k: usize,
    /// The first pipeline generation (default: the built-in stages).
    #[serde(default)]
    pub pipeline: crate::pipeline::PipelineSpec,
    /// Where the forward pass runs: "cpu" (default), "cuda" or "cuda:N". A GPU that cannot
    /// be used falls back to the CPU with a log line.
    #[serde(default = "d_device")]
    pub device: String,
}

fn d_device() -> String {
    "cpu".into()
}

fn d_max_batch() -> usize {
    8
}
fn d_step_tokens() -> usize {
    256
}
fn d_max_waiting() -> usize {
    256
}
fn d_temperature() -> f32 {
    1.0
}
fn d_top_p() -> f32 {
    1.0
}

impl ModelConfig {
    /// A model served from `path` with default settings, named after the file.
    pub fn from_path(path: &Path) -> Self {
        Self {
            name: model_name(path),
            path: path.to_path_buf(),
            max_context: None,
            max_batch: d_max_batch(),
            step_tokens: d_step_tokens(),
            max_waiting: d_max_waiting(),
            threads: 0,
            default_max_tokens: None,
            default_temperature: d_temperature(),
            default_top_p: d_top_p(),
            default_top_k: 0,
            pipeline: Default::default(),
            device: d_device(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub server: ServerSettings,
    pub models: Vec<ModelConfig>,
}

/// The name a model gets from its path: the file name without its extension (`.gguf`,
/// `.safetensors`, `.bin`), or the directory name.
pub fn model_name(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned());
    for ext in [".gguf", ".safetensors", ".bin"] {
        if let Some(stem) = base.strip_suffix(ext) {
            if !stem.is_empty() {
                return stem.to_string();
            }
        }
    }
    base
}

/// Command-line settings that override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub models: Vec<PathBuf>,
    pub admin_token: Option<String>,
    pub log_json: bool,
    pub max_batch: Option<usize>,
    pub threads: Option<usize>,
    pub max_context: Option<usize>,
    pub max_waiting: Option<usize>,
    pub plugin_dirs: Vec<PathBuf>,
    /// Device of every model ("cpu", "cuda", "cuda:N").
    pub device: Option<String>,
}

/// Environment variables read: SWITCHYARD_CONFIG (file) and SWITCHYARD_SERVER__<KEY>.
const ENV_PREFIX: &str = "SWITCHYARD_SERVER__";

impl GatewayConfig {
    /// Build the configuration. `default_model` is used when neither the file nor the flags
    /// name a model.
    pub fn load(ov: &Overrides, default_model: Option<PathBuf>) -> anyhow::Result<Self> {
        use config::{Config, Environment, File, FileFormat};
        let file = ov
            .config_file
            .clone()
            .or_else(|| std::env::var_os("SWITCHYARD_CONFIG").map(PathBuf::from));
        let mut b = Config::builder();
        if let Some(f) = &file {
            if !f.is_file() {
                anyhow::bail!("config file {}: no such file", f.display());
            }
            b = b.add_source(File::from(f.as_path()).format(FileFormat::Toml));
        }
        // Only SWITCHYARD_SERVER__* (other SWITCHYARD_* variables belong to other parts).
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        b = b.add_source(
            Environment::with_prefix("SWITCHYARD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.into_iter().collect())),
        );
        if let Some(h) = &ov.host {
            b = b.set_override("server.host", h.as_str())?;
        }
        if let Some(p) = ov.port {
            b = b.set_override("server.port", p as i64)?;
        }
        if let Some(t) = &ov.admin_token {
            b = b.set_override("server.admin_token", t.as_str())?;
        }
        if ov.log_json {
            b = b.set_override("server.log_json", true)?;
        }
        let what = file.as_ref().map_or("configuration".to_string(), |f| {
            format!("config file {}", f.display())
        });
        let built = b.build().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        let mut cfg: GatewayConfig = built
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        if !ov.plugin_dirs.is_empty() {
            cfg.server.plugin_dirs = ov.plugin_dirs.clone();
        }
        if !ov.models.is_empty() {
            cfg.models = ov
                .models
                .iter()
                .map(|p| ModelConfig::from_path(p))
                .collect();
        }
        if cfg.models.is_empty() {
            match default_model {
                Some(p) => cfg.models.push(ModelConfig::from_path(&p)),
                None => anyhow::bail!(
                    "no model to serve: pass --model PATH, list [[models]] in a config file, \
                     or fetch the default model with scripts/fetch-default-model.sh"
                ),
            }
        }
        for m in &mut cfg.models {
            if let Some(b) = ov.max_batch {
                m.max_batch = b;
            }
            if let Some(t) = ov.threads {
                m.threads = t;
            }
            if let Some(c) = ov.max_context {
                m.max_context = Some(c);
            }
            if let Some(w) = ov.max_waiting {
                m.max_waiting = w;
            }
            if let Some(d) = &ov.device {
                m.device = d.clone();
            }
        }
        cfg.validate().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let s = &self.server;
        if s.host.is_empty() {
            return Err("server.host is empty".into());
        }
        if s.max_body_bytes < 1024 {
            return Err(format!(
                "server.max_body_bytes must be at least 1024, got {}",
                s.max_body_bytes
            ));
        }
        for d in &s.plugin_dirs {
            if !d.is_dir() {
                return Err(format!(
                    "server.plugin_dirs: {} is not a directory",
                    d.display()
                ));
            }
        }
        if !(1..=60_000).contains(&s.wasm_call_deadline_ms) {
            return Err(format!(
                "server.wasm_call_deadline_ms must be in 1..=60000, got {}",
                s.wasm_call_deadline_ms
            ));
        }
        if !(1..=4096).contains(&s.wasm_max_memory_mb) {
            return Err(format!(
                "server.wasm_max_memory_mb must be in 1..=4096, got {}",
                s.wasm_max_memory_mb
            ));
        }
        if s.admin_token.as_deref() == Some("") {
            return Err(
                "server.admin_token is empty (leave it out to disable the admin API)".into(),
            );
        }
        let mut names = HashSet::new();
        for m in &self.models {
            let at = format!("model {:?}", m.name);
            if m.name.is_empty() || m.name.contains(char::is_whitespace) {
                return Err(format!(
                    "{at}: a model name must be non-empty without whitespace"
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(format!(
                    "{at} is listed twice (names must be unique; rename one in a config file)"
                ));
            }
            if !m.path.exists() {
                return Err(format!("{at}: {} does not exist", m.path.display()));
            }
            if m.max_batch == 0 || m.max_batch > 256 {
                return Err(format!(
                    "{at}: max_batch must be in 1..=256, got {}",
                    m.max_batch
                ));
            }
            if m.step_tokens < m.max_batch {
                return Err(format!(
                    "{at}: step_tokens ({}) must be at least max_batch ({})",
                    m.step_tokens, m.max_batch
                ));
            }
            if m.max_waiting == 0 {
                return Err(format!("{at}: max_waiting must be at least 1"));
            }
            if let Err(e) = m.device.parse::<switchyard_engine::backend::Device>() {
                return Err(format!("{at}: {e}"));
            }
            if m.max_context == Some(0) || m.max_context == Some(1) {
                return Err(format!("{at}: max_context must be at least 2"));
            }
            if m.default_max_tokens == Some(0) {
                return Err(format!("{at}: default_max_tokens must be at least 1"));
            }
            if !(m.default_temperature >= 0.0 && m.default_temperature <= 2.0) {
                return Err(format!(
                    "{at}: default_temperature must be in [0, 2], got {}",
                    m.default_temperature
                ));
            }
            if !(m.default_top_p > 0.0 && m.default_top_p <= 1.0) {
                return Err(format!(
                    "{at}: default_top_p must be in (0, 1], got {}",
                    m.default_top_p
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_model_extensions() {
        assert_eq!(
            model_name(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(
            model_name(Path::new("../models/stories260K")),
            "stories260K"
        );
        assert_eq!(model_name(Path::new("x.safetensors")), "x");
    }

    #[test]
    fn file_env_and_flags_layer() {
        let dir = std::env::temp_dir().join(format!("sy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"x").unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            format!(
                "[server]\nport = 9001\n[[models]]\nname = \"a\"\npath = {:?}\nmax_batch = 4\n",
                model.display().to_string()
            ),
        )
        .unwrap();
        let ov = Overrides {
            config_file: Some(f.clone()),
            host: Some("0.0.0.0".into()),
            ..Default::default()
        };
        let c = GatewayConfig::load(&ov, None).unwrap();
        assert_eq!(c.server.port, 9001);
        assert_eq!(c.server.host, "0.0.0.0");
        assert_eq!(c.models[0].name, "a");
        assert_eq!(c.models[0].max_batch, 4);
        assert_eq!(c.models[0].step_tokens, 256);

        std::fs::write(&f, "[server]\nprot = 1\n").unwrap();
        let e = GatewayConfig::load(&ov, None).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("prot"), "{e}");

        std::fs::write(
            &f,
            format!(
                "[[models]]\nname = \"a\"\npath = {:?}\nmax_batch = 0\n",
                model.display().to_string()
            ),
        )
        .unwrap();
        let e = GatewayConfig::load(&ov, None).unwrap_err().to_string();
        assert!(e.contains("max_batch must be in 1..=256, got 0"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
