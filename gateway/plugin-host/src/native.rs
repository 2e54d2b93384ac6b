//! Native plugins: dlopen, the ABI handshake, and safe wrappers over the vtables.

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use switchyard_engine::kv::{KvAllocator, KvLayout, KvStats};
use switchyard_engine::{EngineError, Result as EngineResult};
use switchyard_plugin_abi as abi;

use crate::{HostError, Manifest, Result};

/// A loaded native plugin (the library stays loaded for the life of the process).
#[derive(Debug, Clone)]
pub struct NativePlugin {
    pub name: String,
    pub version: String,
    pub kind: u32,
    pub abi: (u32, u32),
    pub features: u64,
    pub path: PathBuf,
    pub sha256: String,
    desc: &'static abi::PluginDescriptor,
}

/// Open `file` (never unloaded) and read its descriptor, checking the ABI version.
fn open(file: &Path) -> Result<&'static abi::PluginDescriptor> {
    let hs = |msg: String| HostError::Handshake {
        path: file.to_path_buf(),
        msg,
    };
    // SAFETY: loading a library runs its initializers; the file was approved by sha256 and
    // lies in a plugin directory.
    let lib = unsafe { libloading::Library::new(file) }.map_err(|e| HostError::Load {
        path: file.to_path_buf(),
        msg: e.to_string(),
    })?;
    // Never unloaded: see the crate docs.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: the root symbol has the RootFn signature by the ABI contract.
    let root: libloading::Symbol<abi::RootFn> =
        unsafe { lib.get(abi::ROOT_SYMBOL) }.map_err(|_| HostError::NoRoot {
            path: file.to_path_buf(),
        })?;
    // SAFETY: calling the plugin's root function (no arguments).
    let d = unsafe { root() };
    if d.is_null() {
        return Err(hs("the root symbol returned no descriptor".into()));
    }
    // SAFETY: a non-null descriptor is a static of the library, which is never unloaded.
    let desc: &'static abi::PluginDescriptor = unsafe { &*d };
    if desc.abi_major != abi::ABI_MAJOR {
        return Err(hs(format!(
            "plugin ABI {}.{} is incompatible with this host's {}.{} (majors differ)",
            desc.abi_major,
            desc.abi_minor,
            abi::ABI_MAJOR,
            abi::ABI_MINOR
        )));
    }
    if desc.abi_minor > abi::ABI_MINOR {
        return Err(hs(format!(
            "plugin ABI {}.{} is newer than this host's {}.{}",
            desc.abi_major,
            desc.abi_minor,
            abi::ABI_MAJOR,
            abi::ABI_MINOR
        )));
    }
    Ok(desc)
}

/// What a native plugin library says about itself: (kind, name, version, ABI).
/// Loads the library (running its initializers) without a manifest: for authors' tools.
pub fn describe(file: &Path) -> Result<(String, String, String, (u32, u32))> {
    let desc = open(file)?;
    let (name, version) = names(file, desc)?;
    Ok((
        abi::kind::name(desc.kind).to_string(),
        name,
        version,
        (desc.abi_major, desc.abi_minor),
    ))
}

fn names(file: &Path, desc: &abi::PluginDescriptor) -> Result<(String, String)> {
    let hs = |msg: String| HostError::Handshake {
        path: file.to_path_buf(),
        msg,
    };
    // SAFETY: descriptor strings live as long as the library.
    let name = unsafe { desc.name.as_str() }
        .map_err(|_| hs("descriptor name is not UTF-8".into()))?
        .to_string();
    let version = unsafe { desc.version.as_str() }
        .map_err(|_| hs("descriptor version is not UTF-8".into()))?
        .to_string();
    Ok((name, version))
}

pub(crate) fn load(m: &Manifest, file: &Path) -> Result<NativePlugin> {
    let hs = |msg: String| HostError::Handshake {
        path: file.to_path_buf(),
        msg,
    };
    let desc = open(file)?;
    let (name, version) = names(file, desc)?;
    let kind_name = abi::kind::name(desc.kind);
    if kind_name != m.kind {
        return Err(hs(format!(
            "the library is a {kind_name} plugin, the manifest says {}",
            m.kind
        )));
    }
    if name != m.name {
        return Err(hs(format!(
            "the library is plugin {name:?}, the manifest says {:?}",
            m.name
        )));
    }
    if (desc.abi_major, desc.abi_minor) != m.abi_version().unwrap_or((0, 0)) {
        return Err(hs(format!(
            "the library was built for ABI {}.{}, the manifest says {}",
            desc.abi_major, desc.abi_minor, m.abi
        )));
    }
    let need = match desc.kind {
        abi::kind::KV_ALLOCATOR => std::mem::size_of::<abi::KvAllocatorVTable>(),
        _ => 0,
    };
    if desc.vtable.is_null() || desc.vtable_size < need {
        return Err(hs(format!(
            "vtable of {} bytes, this host needs {need}",
            desc.vtable_size
        )));
    }
    Ok(NativePlugin {
        name,
        version,
        kind: desc.kind,
        abi: (desc.abi_major, desc.abi_minor),
        features: desc.features,
        path: file.to_path_buf(),
        sha256: m.sha256.to_ascii_lowercase(),
        desc,
    })
}

/// Room for plugin error messages.
const ERR_CAP: usize = 1024;

fn call_err(name: &str, status: abi::Status, buf: &[u8], len: usize) -> String {
    let msg = String::from_utf8_lossy(&buf[..len.min(buf.len())]).into_owned();
    let what = match status {
        abi::Status::PANIC => "panicked",
        abi::Status::EXHAUSTED => "is out of capacity",
        abi::Status::INVALID => "rejected an argument",
        _ => "failed",
    };
    if msg.is_empty() {
        format!("plugin {name} {what} (status {})", status.0)
    } else {
        format!("plugin {name} {what}: {msg}")
    }
}

impl NativePlugin {
    /// A new KV allocator instance from a `kv-allocator` plugin.
    pub fn kv_allocator(&self, config: &str, layout: KvLayout) -> Result<NativeKvAllocator> {
        if self.kind != abi::kind::KV_ALLOCATOR {
            return Err(HostError::Call {
                name: self.name.clone(),
                msg: format!(
                    "is a {} plugin, not a kv-allocator",
                    abi::kind::name(self.kind)
                ),
            });
        }
        // SAFETY: checked kind and vtable size at load.
        let vt: &'static abi::KvAllocatorVTable =
            unsafe { &*(self.desc.vtable as *const abi::KvAllocatorVTable) };
        let l = abi::KvLayoutC {
            n_layers: layout.n_layers as u64,
            kv_heads: layout.kv_heads as u64,
            head_dim: layout.head_dim as u64,
            max_context: layout.max_context as u64,
            max_slots: layout.max_slots as u64,
        };
        let mut h: abi::Handle = std::ptr::null_mut();
        let mut buf = vec![0u8; ERR_CAP];
        let mut eb = abi::ErrorBuf {
            ptr: buf.as_mut_ptr(),
            cap: ERR_CAP,
            len: 0,
        };
        // SAFETY: valid pointers for the duration of the call.
        let st = unsafe { (vt.create)(abi::Str::borrow(config), &l, &mut h, &mut eb) };
        if !st.is_ok() || h.is_null() {
            return Err(HostError::Call {
                name: self.name.clone(),
                msg: call_err(&self.name, st, &buf, eb.len),
            });
        }
        Ok(NativeKvAllocator {
            vt,
            h,
            layout,
            name: self.name.clone(),
            err: buf,
        })
    }
}

/// A plugin's KV allocator behind the engine's [`KvAllocator`] trait.
pub struct NativeKvAllocator {
    vt: &'static abi::KvAllocatorVTable,
    h: *mut c_void,
    layout: KvLayout,
    name: String,
    err: Vec<u8>,
}

// SAFETY: the SDK requires KvAllocator implementations to be Send; the handle is used from
// one thread at a time (&mut self).
unsafe impl Send for NativeKvAllocator {}

impl NativeKvAllocator {
    fn check(&mut self, f: impl FnOnce(&mut abi::ErrorBuf) -> abi::Status) -> EngineResult<()> {
        let mut eb = abi::ErrorBuf {
            ptr: self.err.as_mut_ptr(),
            cap: self.err.len(),
            len: 0,
        };
        let st = f(&mut eb);
        if st.is_ok() {
            Ok(())
        } else {
            Err(EngineError::Kv(call_err(&self.name, st, &self.err, eb.len)))
        }
    }
}

impl Drop for NativeKvAllocator {
    fn drop(&mut self) {
        // SAFETY: the handle came from create and is dropped once.
        unsafe { (self.vt.destroy)(self.h) };
    }
}

impl KvAllocator for NativeKvAllocator {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn acquire(&mut self) -> EngineResult<usize> {
        let mut slot = 0u64;
        let (vt, h) = (self.vt, self.h);
        // SAFETY: valid handle and pointers.
        self.check(|eb| unsafe { (vt.acquire)(h, &mut slot, eb) })?;
        Ok(slot as usize)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> EngineResult<()> {
        let (vt, h) = (self.vt, self.h);
        // SAFETY: valid handle and pointers.
        self.check(|eb| unsafe { (vt.ensure)(h, slot as u64, n_tokens as u64, eb) })
    }
    fn capacity(&self, slot: usize) -> usize {
        // SAFETY: valid handle.
        unsafe { (self.vt.capacity)(self.h, slot as u64) as usize }
    }
    fn release(&mut self, slot: usize) {
        // SAFETY: valid handle.
        unsafe { (self.vt.release)(self.h, slot as u64) }
    }
    fn kv(&mut self, layer: usize, slot: usize) -> (*mut f32, *mut f32) {
        let (mut k, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid handle and out pointers.
        let st = unsafe { (self.vt.kv)(self.h, layer as u64, slot as u64, &mut k, &mut v) };
        // The engine only asks for slots it ensured; a failure here is a plugin bug that
        // would otherwise become a wild write.
        assert!(
            st.is_ok() && !k.is_null() && !v.is_null(),
            "plugin {} returned no K/V for layer {layer}, slot {slot}",
            self.name
        );
        (k, v)
    }
    fn stats(&self) -> KvStats {
        let mut s = abi::KvStatsC::default();
        // SAFETY: valid handle and out pointer.
        unsafe { (self.vt.stats)(self.h, &mut s) };
        KvStats {
            reserved_bytes: s.reserved_bytes,
            mapped_bytes: s.mapped_bytes,
            used_bytes: s.used_bytes,
            slots_in_use: s.slots_in_use as usize,
        }
    }
    fn name(&self) -> &str {
        &self.name
    }
}
