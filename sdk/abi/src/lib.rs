//! The C ABI between the Switchyard host and native plugins (cdylib).
//!
//! A plugin exports one symbol, [`ROOT_SYMBOL`] (`switchyard_plugin_v1`), an
//! `extern "C" fn() -> *const PluginDescriptor`. The descriptor says which ABI version the
//! plugin was built against, its kind, name, version and feature bits, and points at the
//! vtable of its kind. The host accepts the plugin when the ABI majors are equal and the
//! host's minor is at least the plugin's.
//!
//! Rules that keep the ABI stable:
//! - only `#[repr(C)]` types and `extern "C"` functions cross the boundary (no `String`,
//!   `Vec`, trait objects, or Rust panics);
//! - vtables are append-only: a new minor version adds fields at the end, and the descriptor's
//!   `vtable_size` tells the host how many the plugin has;
//! - every fallible call returns a [`Status`] and writes its reason into a host-owned
//!   [`ErrorBuf`];
//! - strings are borrowed UTF-8 [`Str`] slices, valid for the duration of the call (the
//!   descriptor's strings for the life of the library).

#![allow(clippy::missing_safety_doc)]

use std::ffi::c_void;

pub const ABI_MAJOR: u32 = 1;
/// 1.1 appended `KvAllocatorVTable::page_stats`.
pub const ABI_MINOR: u32 = 1;

/// The one symbol a native plugin exports (NUL-terminated for `dlsym`).
pub const ROOT_SYMBOL: &[u8] = b"switchyard_plugin_v1\0";

/// The type of [`ROOT_SYMBOL`].
pub type RootFn = unsafe extern "C" fn() -> *const PluginDescriptor;

/// Result of a call: 0 is success.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub i32);

impl Status {
    pub const OK: Status = Status(0);
    /// The call failed; the error buffer says why.
    pub const ERROR: Status = Status(1);
    /// The plugin panicked; the export macro caught it at the boundary.
    pub const PANIC: Status = Status(2);
    /// An argument was out of range.
    pub const INVALID: Status = Status(3);
    /// Out of capacity (slots, pages, memory).
    pub const EXHAUSTED: Status = Status(4);
    /// The plugin does not provide this optional call.
    pub const UNSUPPORTED: Status = Status(5);

    pub fn is_ok(self) -> bool {
        self == Status::OK
    }
}

/// Plugin kinds (the `kind` field of the descriptor).
pub mod kind {
    pub const KV_ALLOCATOR: u32 = 1;
    pub const LINEAR_KERNELS: u32 = 2;
    pub const MODEL_TRANSFORM: u32 = 3;

    pub fn name(k: u32) -> &'static str {
        match k {
            KV_ALLOCATOR => "kv-allocator",
            LINEAR_KERNELS => "linear-kernels",
            MODEL_TRANSFORM => "model-transform",
            _ => "unknown",
        }
    }

    pub fn from_name(s: &str) -> Option<u32> {
        match s {
            "kv-allocator" => Some(KV_ALLOCATOR),
            "linear-kernels" => Some(LINEAR_KERNELS),
            "model-transform" => Some(MODEL_TRANSFORM),
            _ => None,
        }
    }
}

/// A borrowed UTF-8 string.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Str {
    pub ptr: *const u8,
    pub len: usize,
}

// SAFETY: a Str only ever points at immutable data (string literals or call arguments).
unsafe impl Sync for Str {}
unsafe impl Send for Str {}

impl Str {
    pub const fn new(s: &'static str) -> Str {
        Str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    pub fn borrow(s: &str) -> Str {
        Str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr..ptr+len` must be readable for `'a`.
    pub unsafe fn as_str<'a>(&self) -> Result<&'a str, std::str::Utf8Error> {
        if self.len == 0 {
            return Ok("");
        }
        // SAFETY: the caller guarantees the range is readable.
        let b = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(b)
    }
}

/// A host-owned buffer the plugin writes an error message into (truncated to `cap`).
#[repr(C)]
#[derive(Debug)]
pub struct ErrorBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

impl ErrorBuf {
    /// Write `msg` (truncated at a character boundary).
    ///
    /// # Safety
    /// `self.ptr` must be writable for `self.cap` bytes (or null).
    pub unsafe fn write(&mut self, msg: &str) {
        if self.ptr.is_null() {
            return;
        }
        let mut n = msg.len().min(self.cap);
        while n > 0 && !msg.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the caller guarantees cap writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), self.ptr, n) };
        self.len = n;
    }
}

/// What every native plugin exports through [`ROOT_SYMBOL`].
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    pub abi_major: u32,
    pub abi_minor: u32,
    /// One of [`kind`].
    pub kind: u32,
    pub name: Str,
    pub version: Str,
    /// Kind-specific feature bits.
    pub features: u64,
    /// The kind's vtable (e.g. [`KvAllocatorVTable`]).
    pub vtable: *const c_void,
    /// Size in bytes of the plugin's vtable (vtables only grow at the end).
    pub vtable_size: usize,
}

// SAFETY: descriptors are immutable statics.
unsafe impl Sync for PluginDescriptor {}

/// Element types of tensor views.
pub mod dtype {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const BF16: u32 = 2;
    pub const I8: u32 = 3;
    pub const U8: u32 = 4;
    pub const I32: u32 = 5;
}

/// Where a tensor lives.
pub mod device {
    pub const CPU: u32 = 0;
    pub const CUDA: u32 = 1;
}

/// A view of a tensor owned by the host (up to 4 dimensions; strides in elements).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TensorView {
    pub ptr: *mut c_void,
    pub dtype: u32,
    pub ndim: u32,
    pub shape: [i64; 4],
    pub strides: [i64; 4],
    pub device: u32,
    pub device_id: i32,
}

impl TensorView {
    /// A dense row-major f32 view of `ptr` on the CPU (up to 4 dimensions; strides in
    /// elements).
    pub fn dense_f32(ptr: *const f32, shape: &[usize]) -> TensorView {
        let mut v = TensorView {
            ptr: ptr as *mut c_void,
            dtype: dtype::F32,
            ndim: shape.len().min(4) as u32,
            shape: [1; 4],
            strides: [1; 4],
            device: device::CPU,
            device_id: 0,
        };
        let mut st = 1i64;
        for d in (0..shape.len().min(4)).rev() {
            v.shape[d] = shape[d] as i64;
            v.strides[d] = st;
            st *= shape[d] as i64;
        }
        v
    }
}

/// On CUDA, the host's context and stream; plugins launch their work on that stream.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CudaContext {
    pub context: *mut c_void,
    pub stream: *mut c_void,
}

/// Shape of the KV cache (see the engine's `KvLayout`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayoutC {
    pub n_layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub max_context: u64,
    pub max_slots: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStatsC {
    pub reserved_bytes: u64,
    pub mapped_bytes: u64,
    pub used_bytes: u64,
    pub slots_in_use: u64,
}

/// Cumulative page counters of a paging KV allocator (ABI 1.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvPageStatsC {
    pub page_bytes: u64,
    /// Pages mapped and unmapped since `create`.
    pub pages_mapped: u64,
    pub pages_unmapped: u64,
    /// Nanoseconds callers waited on mapping inside `acquire`/`ensure`, and how many calls.
    pub sync_map_ns: u64,
    pub sync_maps: u64,
    /// Nanoseconds a background thread spent mapping ahead of need.
    pub ahead_map_ns: u64,
}

/// Opaque per-instance state of a plugin.
pub type Handle = *mut c_void;

/// The `kv-allocator` kind. For each layer, a slot's K (and V) is one contiguous
/// `[capacity, kv_heads, head_dim]` f32 region; pointers stay valid until the next `ensure`
/// or `release` on that slot.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvAllocatorVTable {
    /// A new allocator for `layout`, configured by `config` (plugin-defined text, e.g. TOML).
    pub create: unsafe extern "C" fn(
        config: Str,
        layout: *const KvLayoutC,
        out: *mut Handle,
        err: *mut ErrorBuf,
    ) -> Status,
    pub destroy: unsafe extern "C" fn(h: Handle),
    pub acquire: unsafe extern "C" fn(h: Handle, slot: *mut u64, err: *mut ErrorBuf) -> Status,
    pub ensure:
        unsafe extern "C" fn(h: Handle, slot: u64, n_tokens: u64, err: *mut ErrorBuf) -> Status,
    pub capacity: unsafe extern "C" fn(h: Handle, slot: u64) -> u64,
    pub release: unsafe extern "C" fn(h: Handle, slot: u64),
    pub kv: unsafe extern "C" fn(
        h: Handle,
        layer: u64,
        slot: u64,
        k: *mut *mut f32,
        v: *mut *mut f32,
    ) -> Status,
    pub stats: unsafe extern "C" fn(h: Handle, out: *mut KvStatsC),
    /// Since ABI 1.1 (present when `vtable_size` >= [`KvAllocatorVTable::SIZE_1_1`]): page
    /// counters, or [`Status::UNSUPPORTED`] for allocators that do not page.
    pub page_stats: unsafe extern "C" fn(h: Handle, out: *mut KvPageStatsC) -> Status,
}

impl KvAllocatorVTable {
    /// Size of the ABI 1.0 vtable (up to `stats`): the least a host accepts.
    pub const SIZE_1_0: usize = std::mem::offset_of!(KvAllocatorVTable, page_stats);
    /// Size of the ABI 1.1 vtable (up to `page_stats`).
    pub const SIZE_1_1: usize = std::mem::size_of::<KvAllocatorVTable>();
}

/// A host-owned output buffer for variable-length results (e.g. JSON). When `cap` is too
/// small the plugin sets `len` to the size it needs and returns [`Status::EXHAUSTED`]; the
/// host grows the buffer and calls again.
#[repr(C)]
#[derive(Debug)]
pub struct ByteBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// Block-quantized element types of tensor views (GGML layouts; shapes count elements, and
/// `strides[0]` of a 2-D weight is its row length in bytes).
pub mod qtype {
    pub const Q4_0: u32 = 0x100 + 2;
    pub const Q4_1: u32 = 0x100 + 3;
    pub const Q8_0: u32 = 0x100 + 8;
}

/// The `linear-kernels` kind: the linear layers of a model (sparse or dense).
///
/// The host registers each weight once with `prepare` (id = layer × 16 + projection, see the
/// SDK's `LinearId`), letting the plugin repack it (e.g. column-major for sparse inputs),
/// then calls `linear` for every forward pass: `y[n, out] = x[n, in] · W[out, in]ᵀ`. On CUDA
/// the host passes its context and stream (`cuda` is null on the CPU).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LinearKernelsVTable {
    pub create: unsafe extern "C" fn(config: Str, out: *mut Handle, err: *mut ErrorBuf) -> Status,
    pub destroy: unsafe extern "C" fn(h: Handle),
    pub prepare: unsafe extern "C" fn(
        h: Handle,
        id: u64,
        weight: *const TensorView,
        err: *mut ErrorBuf,
    ) -> Status,
    pub linear: unsafe extern "C" fn(
        h: Handle,
        id: u64,
        x: *const TensorView,
        y: *const TensorView,
        cuda: *const CudaContext,
        err: *mut ErrorBuf,
    ) -> Status,
}

/// The `model-transform` kind: an offline rewrite of a model's tensors (Gstack growth,
/// AdaptiVocab embeddings). The host streams: it asks for a plan, then for each output
/// tensor of the plan loads that tensor's sources and calls `produce`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModelTransformVTable {
    pub create: unsafe extern "C" fn(config: Str, out: *mut Handle, err: *mut ErrorBuf) -> Status,
    pub destroy: unsafe extern "C" fn(h: Handle),
    /// `model` is the input model as JSON (`{"config": {…config.json…}, "tensors":
    /// [{"name", "dtype", "shape"}…]}`); the plan written to `out` is JSON
    /// `{"config": {…}, "tensors": [{"name", "dtype", "shape", "sources": [names…]}…]}`.
    pub plan: unsafe extern "C" fn(
        h: Handle,
        model: Str,
        out: *mut ByteBuf,
        err: *mut ErrorBuf,
    ) -> Status,
    /// Fill output tensor `index` of the plan from its sources, in the plan's order.
    pub produce: unsafe extern "C" fn(
        h: Handle,
        index: u64,
        sources: *const TensorView,
        n_sources: u64,
        out: *const TensorView,
        err: *mut ErrorBuf,
    ) -> Status,
}
