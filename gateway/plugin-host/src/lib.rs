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

pub use manifest::Manifest;
pub use native::{NativeKvAllocator, NativePlugin};

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

    /// Verify and load a native plugin.
    pub fn load_native(&self, manifest_path: &Path) -> Result<NativePlugin> {
        let (m, file) = self.verify(manifest_path)?;
        native::load(&m, &file)
    }
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|e| HostError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let d = Sha256::digest(&bytes);
    Ok(d.iter().map(|b| format!("{b:02x}")).collect())
}
