//! `plugin.toml`:
//!
//! ```toml
//! name = "kv-heap"
//! version = "0.1.0"
//! kind = "kv-allocator"            # kv-allocator | linear-kernels | model-transform | tokenizer-patch
//! abi = "1.0"                      # the SDK ABI the plugin was built against
//! file = "libswitchyard_kv_heap.so"  # relative to the manifest
//! sha256 = "…"                     # of that file
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::{HostError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub abi: String,
    pub file: String,
    pub sha256: String,
}

pub const KINDS: &[&str] = &[
    "kv-allocator",
    "linear-kernels",
    "model-transform",
    "tokenizer-patch",
];

impl Manifest {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |msg: String| HostError::Manifest {
            path: path.to_path_buf(),
            msg,
        };
        let m: Manifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if m.name.is_empty() {
            return Err(bad("name is empty".into()));
        }
        if !KINDS.contains(&m.kind.as_str()) {
            return Err(bad(format!(
                "kind {:?} is not one of {}",
                m.kind,
                KINDS.join(", ")
            )));
        }
        m.abi_version().map_err(bad)?;
        if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "sha256 must be 64 hex digits, got {:?}",
                m.sha256
            )));
        }
        if m.file.is_empty() {
            return Err(bad("file is empty".into()));
        }
        Ok(m)
    }

    /// The manifest as `plugin.toml` text.
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        format!(
            "name = {}\nversion = {}\nkind = {}\nabi = {}\nfile = {}\nsha256 = {}\n",
            q(&self.name),
            q(&self.version),
            q(&self.kind),
            q(&self.abi),
            q(&self.file),
            q(&self.sha256)
        )
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| HostError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// `abi = "MAJOR.MINOR"`.
    pub fn abi_version(&self) -> std::result::Result<(u32, u32), String> {
        let (a, b) = self
            .abi
            .split_once('.')
            .ok_or_else(|| format!("abi must be \"MAJOR.MINOR\", got {:?}", self.abi))?;
        let p = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("abi must be \"MAJOR.MINOR\", got {:?}", self.abi))
        };
        Ok((p(a)?, p(b)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_checked() {
        let p = Path::new("plugin.toml");
        let ok = "name = \"a\"\nversion = \"1\"\nkind = \"kv-allocator\"\nabi = \"1.0\"\nfile = \"a.so\"\nsha256 = \"".to_string()
            + &"ab".repeat(32)
            + "\"\n";
        let m = Manifest::parse(&ok, p).unwrap();
        assert_eq!(m.abi_version().unwrap(), (1, 0));
        let e = Manifest::parse(&ok.replace("kv-allocator", "gpu"), p).unwrap_err();
        assert!(e.to_string().contains("kind \"gpu\""), "{e}");
        let e = Manifest::parse(&ok.replace("1.0", "one"), p).unwrap_err();
        assert!(e.to_string().contains("MAJOR.MINOR"), "{e}");
        let e = Manifest::parse(&(ok.clone() + "extra = 1\n"), p).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = Manifest::parse(&ok.replace(&"ab".repeat(32), "xyz"), p).unwrap_err();
        assert!(e.to_string().contains("64 hex"), "{e}");
    }
}
