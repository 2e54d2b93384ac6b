//! Author side of Switchyard's native plugin SDK.
//!
//! Implement the trait of your plugin's kind and export it:
//!
//! ```ignore
//! use switchyard_plugin::{KvAllocator, KvLayout, KvStats, export_kv_allocator};
//! struct MyKv { /* … */ }
//! impl KvAllocator for MyKv { /* … */ }
//! export_kv_allocator!(MyKv, name = "my-kv", version = "0.1.0");
//! ```
//!
//! and build the crate as a `cdylib`. The macro emits the one root symbol
//! (`switchyard_plugin_v1`), the descriptor and the vtable; every call goes through a
//! trampoline that turns `Err` into a status plus message and catches panics, so neither
//! errors nor unwinding cross the C boundary.

pub use switchyard_plugin_abi as abi;

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi::{ErrorBuf, Handle, KvLayoutC, KvStatsC, Status, Str};

/// Shape of the KV cache the host needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_context: usize,
    pub max_slots: usize,
}

impl KvLayout {
    /// f32 elements of one token's K (or V) in one layer.
    pub fn token_elems(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    pub reserved_bytes: u64,
    pub mapped_bytes: u64,
    pub used_bytes: u64,
    pub slots_in_use: usize,
}

/// Errors a plugin reports: a status and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub status: Status,
    pub message: String,
}

impl PluginError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            status: Status::ERROR,
            message: message.into(),
        }
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self {
            status: Status::EXHAUSTED,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: Status::INVALID,
            message: message.into(),
        }
    }
}

impl From<String> for PluginError {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for PluginError {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

pub type PluginResult<T> = Result<T, PluginError>;

/// The `kv-allocator` kind: the same contract as the engine's `KvAllocator` trait.
pub trait KvAllocator: Send + 'static {
    /// A new allocator for `layout`; `config` is the pipeline's configuration text for this
    /// stage (may be empty).
    fn create(config: &str, layout: KvLayout) -> PluginResult<Self>
    where
        Self: Sized;
    fn acquire(&mut self) -> PluginResult<usize>;
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> PluginResult<()>;
    fn capacity(&self, slot: usize) -> usize;
    fn release(&mut self, slot: usize);
    /// Bases of `slot`'s K and V for `layer`, each `[capacity, kv_heads, head_dim]` f32.
    fn kv(&mut self, layer: usize, slot: usize) -> PluginResult<(*mut f32, *mut f32)>;
    fn stats(&self) -> KvStats;
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("plugin panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("plugin panicked: {s}")
    } else {
        "plugin panicked".to_string()
    }
}

/// Run `f` at the boundary: `Err` and panics become a status and a message.
///
/// # Safety
/// `err` must be null or a valid [`ErrorBuf`].
pub unsafe fn guard(err: *mut ErrorBuf, f: impl FnOnce() -> PluginResult<()>) -> Status {
    let r = catch_unwind(AssertUnwindSafe(f));
    let (status, msg) = match r {
        Ok(Ok(())) => return Status::OK,
        Ok(Err(e)) => (e.status, e.message),
        Err(p) => (Status::PANIC, panic_message(p)),
    };
    // SAFETY: the caller guarantees err is null or valid.
    if let Some(e) = unsafe { err.as_mut() } {
        unsafe { e.write(&msg) };
    }
    status
}

/// Trampolines from the C vtable to a [`KvAllocator`] implementation.
pub mod kv_trampolines {
    use super::*;

    /// # Safety
    /// Called by the host through the vtable with valid pointers.
    pub unsafe extern "C" fn create<T: KvAllocator>(
        config: Str,
        layout: *const KvLayoutC,
        out: *mut Handle,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                let cfg = config
                    .as_str()
                    .map_err(|e| PluginError::invalid(format!("config is not UTF-8: {e}")))?;
                let l = &*layout;
                let layout = KvLayout {
                    n_layers: l.n_layers as usize,
                    kv_heads: l.kv_heads as usize,
                    head_dim: l.head_dim as usize,
                    max_context: l.max_context as usize,
                    max_slots: l.max_slots as usize,
                };
                let t = T::create(cfg, layout)?;
                *out = Box::into_raw(Box::new(t)) as Handle;
                Ok(())
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>` and is not used afterwards.
    pub unsafe extern "C" fn destroy<T: KvAllocator>(h: Handle) {
        if !h.is_null() {
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
                drop(Box::from_raw(h as *mut T));
            }));
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`; pointers are valid.
    pub unsafe extern "C" fn acquire<T: KvAllocator>(
        h: Handle,
        slot: *mut u64,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                let s = (*(h as *mut T)).acquire()?;
                *slot = s as u64;
                Ok(())
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`.
    pub unsafe extern "C" fn ensure<T: KvAllocator>(
        h: Handle,
        slot: u64,
        n_tokens: u64,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                (*(h as *mut T)).ensure(slot as usize, n_tokens as usize)
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`.
    pub unsafe extern "C" fn capacity<T: KvAllocator>(h: Handle, slot: u64) -> u64 {
        catch_unwind(AssertUnwindSafe(|| unsafe {
            (*(h as *const T)).capacity(slot as usize) as u64
        }))
        .unwrap_or(0)
    }

    /// # Safety
    /// `h` came from `create::<T>`.
    pub unsafe extern "C" fn release<T: KvAllocator>(h: Handle, slot: u64) {
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            (*(h as *mut T)).release(slot as usize)
        }));
    }

    /// # Safety
    /// `h` came from `create::<T>`; `k` and `v` are writable.
    pub unsafe extern "C" fn kv<T: KvAllocator>(
        h: Handle,
        layer: u64,
        slot: u64,
        k: *mut *mut f32,
        v: *mut *mut f32,
    ) -> Status {
        unsafe {
            guard(std::ptr::null_mut(), || {
                let (kp, vp) = (*(h as *mut T)).kv(layer as usize, slot as usize)?;
                *k = kp;
                *v = vp;
                Ok(())
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`; `out` is writable.
    pub unsafe extern "C" fn stats<T: KvAllocator>(h: Handle, out: *mut KvStatsC) {
        let s = catch_unwind(AssertUnwindSafe(|| unsafe { (*(h as *const T)).stats() }))
            .unwrap_or_default();
        unsafe {
            *out = KvStatsC {
                reserved_bytes: s.reserved_bytes,
                mapped_bytes: s.mapped_bytes,
                used_bytes: s.used_bytes,
                slots_in_use: s.slots_in_use as u64,
            }
        };
    }

    /// The vtable of `T`.
    pub const fn vtable<T: KvAllocator>() -> abi::KvAllocatorVTable {
        abi::KvAllocatorVTable {
            create: create::<T>,
            destroy: destroy::<T>,
            acquire: acquire::<T>,
            ensure: ensure::<T>,
            capacity: capacity::<T>,
            release: release::<T>,
            kv: kv::<T>,
            stats: stats::<T>,
        }
    }
}

/// Export a [`KvAllocator`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_kv_allocator {
    ($ty:ty, name = $name:expr, version = $version:expr) => {
        $crate::export_kv_allocator!($ty, name = $name, version = $version, features = 0);
    };
    ($ty:ty, name = $name:expr, version = $version:expr, features = $features:expr) => {
        static SWITCHYARD_KV_VTABLE: $crate::abi::KvAllocatorVTable =
            $crate::kv_trampolines::vtable::<$ty>();
        static SWITCHYARD_DESCRIPTOR: $crate::abi::PluginDescriptor =
            $crate::abi::PluginDescriptor {
                abi_major: $crate::abi::ABI_MAJOR,
                abi_minor: $crate::abi::ABI_MINOR,
                kind: $crate::abi::kind::KV_ALLOCATOR,
                name: $crate::abi::Str::new($name),
                version: $crate::abi::Str::new($version),
                features: $features,
                vtable: &SWITCHYARD_KV_VTABLE as *const $crate::abi::KvAllocatorVTable
                    as *const ::std::ffi::c_void,
                vtable_size: ::std::mem::size_of::<$crate::abi::KvAllocatorVTable>(),
            };
        /// The plugin's root symbol.
        #[no_mangle]
        pub extern "C" fn switchyard_plugin_v1() -> *const $crate::abi::PluginDescriptor {
            &SWITCHYARD_DESCRIPTOR
        }
    };
}
