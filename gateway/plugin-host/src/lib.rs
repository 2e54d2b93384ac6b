//! The plugin host: finds plugins through their manifests, checks them, and loads them.
//!
//! - A manifest (`plugin.toml`) names the plugin, its version, kind, ABI version, file and
//!   the file's sha256. What runs is exactly what the operator approved: a file whose hash
//!   differs is refused.
//! - Plugins are loaded only from the configured plugin directories (after resolving symbolic
//!   links and `..`).
//! - Native plugins go through the ABI handshake: equal majors, host minor ≥ plugin minor,
//!   the kind and name the manifest promises, a vtable at least as large as this host needs.
//! - Native libraries are never unloaded (unloading Rust dylibs is unsound with thread-local
//!   destructors); a new version is loaded from its own file.

pub mod manifest;
pub mod native;
pub mod transform;
pub mod wasm;

pub use manifest::Manifest;
pub use native::{
    ModelLinear, NativeKvAllocator, NativeLinearKernels, NativeModelTransform, NativePlugin,
};
pub use wasm::{PatchStage, WasmCallError, WasmLimits, WasmPlugin, WasmTokenizerPatch};

/// How a plugin call ended (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// The plugin returned an error status.
    Error,
    /// A native plugin panicked (caught at the boundary) or a WebAssembly guest trapped.
    Trap,
    /// A WebAssembly call ran past its deadline.
    Deadline,
    /// A WebAssembly guest tried to grow its memory past the cap.
    Memory,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Error => "error",
            CallOutcome::Trap => "trap",
            CallOutcome::Deadline => "deadline",
            CallOutcome::Memory => "memory",
        }
    }
}

/// Told about every plugin call (the gateway turns these into metrics).
pub trait CallObserver: Send + Sync {
    fn call(&self, plugin: &str, op: &str, duration: std::time::Duration, outcome: CallOutcome);
}

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{path}: {msg}")]
    Manifest { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is outside the plugin directories ({dirs})")]
    OutsideDirs { path: PathBuf, dirs: String },
    #[error("{path}: sha256 is {got}, but the manifest says {want}")]
    Hash {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("{path}: cannot load the library: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("{path}: no root symbol `switchyard_plugin_v1` (not a Switchyard plugin?)")]
    NoRoot { path: PathBuf },
    #[error("{path}: {msg}")]
    Handshake { path: PathBuf, msg: String },
    #[error("plugin {name}: {msg}")]
    Call { name: String, msg: String },
}

pub type Result<T> = std::result::Result<T, HostError>;

/// Loads plugins from a fixed set of directories.
#[derive(Debug, Clone)]
pub struct PluginHost {
    dirs: Vec<PathBuf>,
}

impl PluginHost {
    /// `dirs` are the only places plugins may come from (missing ones are ignored).
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self {
            dirs: dirs.iter().filter_map(|d| d.canonicalize().ok()).collect(),
        }
    }

    /// Resolve `path` and check it lies inside a plugin directory.
    pub fn allowed(&self, path: &Path) -> Result<PathBuf> {
        let p = path.canonicalize().map_err(|e| HostError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if self.dirs.iter().any(|d| p.starts_with(d)) {
            Ok(p)
        } else {
            Err(HostError::OutsideDirs {
                path: path.to_path_buf(),
                dirs: if self.dirs.is_empty() {
                    "none configured".into()
                } else {
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
        }
    }

    /// Read a manifest from a plugin directory and check its file (location and sha256).
    /// Returns the manifest and the file's resolved path.
    pub fn verify(&self, manifest_path: &Path) -> Result<(Manifest, PathBuf)> {
        let mp = self.allowed(manifest_path)?;
        let m = Manifest::read(&mp)?;
        let file = mp.parent().unwrap_or(Path::new(".")).join(&m.file);
        let file = self.allowed(&file)?;
        let got = sha256_file(&file)?;
        if !got.eq_ignore_ascii_case(&m.sha256) {
            return Err(HostError::Hash {
                path: file,
                got,
                want: m.sha256.clone(),
            });
        }
        Ok((m, file))
    }

    /// Verify and load a WebAssembly (component) plugin.
    pub fn load_wasm(&self, manifest_path: &Path) -> Result<WasmPlugin> {
        let (m, file) = self.verify(manifest_path)?;
        if m.kind != "tokenizer-patch" {
            return Err(HostError::Manifest {
                path: manifest_path.to_path_buf(),
                msg: format!("kind {} is a native kind, not a WebAssembly one", m.kind),
            });
        }
        wasm::load(&m, &file)
    }

    /// Verify and load a native plugin.
    pub fn load_native(&self, manifest_path: &Path) -> Result<NativePlugin> {
        let (m, file) = self.verify(manifest_path)?;
        native::load(&m, &file)
    }
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| HostError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(sha256_bytes(&bytes))
}

/// What [`pack`] wrote.
#[derive(Debug, Clone)]
pub struct Packed {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub file_path: PathBuf,
}

/// Put a built plugin into `out_dir` with its manifest (`<name>.toml`): a native library as
/// it is, a WebAssembly core module turned into a component first. Name, version, kind and
/// ABI come from the plugin itself (the native descriptor, or the component's `info()`).
/// This loads the plugin: use it on files you built.
pub fn pack(file: &Path, out_dir: &Path) -> Result<Packed> {
    let io = |path: &Path, e: std::io::Error| HostError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let bytes = std::fs::read(file).map_err(|e| io(file, e))?;
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let (manifest, data, file_name) = if bytes.starts_with(b"\0asm") {
        let component = if wasm::is_core_module(&bytes) {
            wasm::componentize(&bytes).map_err(|msg| HostError::Load {
                path: file.to_path_buf(),
                msg,
            })?
        } else {
            bytes
        };
        let info = wasm::describe(&component).map_err(|msg| HostError::Load {
            path: file.to_path_buf(),
            msg,
        })?;
        let file_name = format!("{}.wasm", info.name);
        let m = Manifest {
            name: info.name,
            version: info.version,
            kind: "tokenizer-patch".into(),
            abi: format!("{}.{}", wasm::WIT_VERSION.0, wasm::WIT_VERSION.1),
            file: file_name.clone(),
            sha256: sha256_bytes(&component),
        };
        (m, component, file_name)
    } else {
        let (kind, name, version, (major, minor)) = native::describe(file)?;
        let file_name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("lib{name}.so"));
        let m = Manifest {
            name,
            version,
            kind,
            abi: format!("{major}.{minor}"),
            file: file_name.clone(),
            sha256: sha256_bytes(&bytes),
        };
        (m, bytes, file_name)
    };
    let file_path = out_dir.join(&file_name);
    // Write beside, then rename: a running gateway never sees half a file.
    let tmp = out_dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, &data).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &file_path).map_err(|e| io(&file_path, e))?;
    let manifest_path = out_dir.join(format!("{}.toml", manifest.name));
    // The manifest too: a reader (or a concurrent pack) never sees half of it.
    let tmp = out_dir.join(format!(
        ".{}.toml.tmp-{}",
        manifest.name,
        std::process::id()
    ));
    std::fs::write(&tmp, manifest.to_toml()).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &manifest_path).map_err(|e| io(&manifest_path, e))?;
    Ok(Packed {
        manifest,
        manifest_path,
        file_path,
    })
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
