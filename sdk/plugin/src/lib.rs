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

/// Cumulative page counters of a paging allocator (see [`KvAllocator::page_stats`]): the
/// ABI's own `#[repr(C)]` struct, passed through as is.
pub use abi::KvPageStatsC as PageStats;

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
    /// Page counters, for allocators that map pages (ABI 1.1); `None` for the others.
    fn page_stats(&self) -> Option<PageStats> {
        None
    }
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
/// The `key = value` lines of a plugin configuration text (`#` starts a comment, blank
/// lines are skipped): `(line number, key, value)`, trimmed. The shared reader for plugins
/// whose configuration is a few settings.
pub fn config_pairs(text: &str) -> Result<Vec<(usize, &str, &str)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected `key = value`, got {line:?}", n + 1))?;
        out.push((n + 1, k.trim(), v.trim()));
    }
    Ok(out)
}

/// `produce` of a transform whose output tensor is a copy of its one source (Gstack, the
/// identity): checks the sizes against the planned element count `n`, then copies.
pub fn copy_one_source(n: usize, sources: &[Tensor], out: &Tensor) -> PluginResult<()> {
    let [src] = sources else {
        return Err(PluginError::invalid("one source expected"));
    };
    // SAFETY: host views valid for the call.
    let (s, o) = unsafe { (src.as_f32()?, out.as_f32_mut()?) };
    if s.len() != n || o.len() != n {
        return Err(PluginError::invalid(
            "source and output sizes differ from the plan",
        ));
    }
    o.copy_from_slice(s);
    Ok(())
}

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

    /// # Safety
    /// `h` came from `create::<T>`; `out` is writable.
    pub unsafe extern "C" fn page_stats<T: KvAllocator>(
        h: Handle,
        out: *mut abi::KvPageStatsC,
    ) -> Status {
        let s = catch_unwind(AssertUnwindSafe(|| unsafe {
            (*(h as *const T)).page_stats()
        }));
        match s {
            Ok(Some(p)) => {
                unsafe { *out = p };
                Status::OK
            }
            Ok(None) => Status::UNSUPPORTED,
            Err(_) => Status::PANIC,
        }
    }

    /// The vtable of `T`.
    pub const fn vtable<T: KvAllocator>() -> abi::KvAllocatorVTable {
        abi::KvAllocatorVTable {
            create: create::<T>,
            destroy: destroy_boxed::<T>,
            acquire: acquire::<T>,
            ensure: ensure::<T>,
            capacity: capacity::<T>,
            release: release::<T>,
            kv: kv::<T>,
            stats: stats::<T>,
            page_stats: page_stats::<T>,
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
        $crate::__export_plugin!(
            $crate::abi::KvAllocatorVTable,
            $crate::kv_trampolines::vtable::<$ty>(),
            $crate::abi::kind::KV_ALLOCATOR,
            $name,
            $version,
            $features
        );
    };
}

// ---------------------------------------------------------------------------------------
// Tensor views

/// A borrowed view of a host tensor (see [`abi::TensorView`]).
#[derive(Debug, Clone, Copy)]
pub struct Tensor {
    pub raw: abi::TensorView,
}

impl Tensor {
    /// Dimensions in use.
    pub fn shape(&self) -> &[i64] {
        &self.raw.shape[..self.raw.ndim as usize]
    }

    pub fn dtype(&self) -> u32 {
        self.raw.dtype
    }

    pub fn on_cpu(&self) -> bool {
        self.raw.device == abi::device::CPU
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape().iter().product::<i64>().max(0) as usize
    }

    /// True when the view is a dense row-major f32 tensor on the CPU.
    pub fn is_dense_f32(&self) -> bool {
        if self.raw.dtype != abi::dtype::F32 || !self.on_cpu() {
            return false;
        }
        let n = self.raw.ndim as usize;
        let mut expect = 1i64;
        for d in (0..n).rev() {
            if self.raw.strides[d] != expect {
                return false;
            }
            expect *= self.raw.shape[d];
        }
        true
    }

    /// The elements of a dense f32 CPU tensor.
    ///
    /// # Safety
    /// The host guarantees the view is valid for the call; do not keep the slice.
    pub unsafe fn as_f32<'a>(&self) -> PluginResult<&'a [f32]> {
        if !self.is_dense_f32() {
            return Err(PluginError::invalid(
                "expected a dense row-major f32 tensor on the CPU",
            ));
        }
        // SAFETY: dense f32 view of numel elements, valid for the call.
        Ok(unsafe { std::slice::from_raw_parts(self.raw.ptr as *const f32, self.numel()) })
    }

    /// The elements of a dense f32 CPU tensor, writable.
    ///
    /// # Safety
    /// As [`as_f32`](Self::as_f32); the host passes output views it does not read meanwhile.
    pub unsafe fn as_f32_mut<'a>(&self) -> PluginResult<&'a mut [f32]> {
        if !self.is_dense_f32() {
            return Err(PluginError::invalid(
                "expected a dense row-major f32 tensor on the CPU",
            ));
        }
        // SAFETY: as above.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.raw.ptr as *mut f32, self.numel()) })
    }

    /// A dense f32 CPU view of `data` with `shape` (for tests and hosts).
    pub fn from_f32(data: &[f32], shape: &[usize]) -> Tensor {
        assert!(shape.len() <= 4 && shape.iter().product::<usize>() == data.len());
        Tensor {
            raw: abi::TensorView::dense_f32(data.as_ptr(), shape),
        }
    }
}

/// Identifies one linear layer: `layer * 16 + projection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearId(pub u64);

impl LinearId {
    pub const Q: u64 = 0;
    pub const K: u64 = 1;
    pub const V: u64 = 2;
    pub const O: u64 = 3;
    pub const GATE: u64 = 4;
    pub const UP: u64 = 5;
    pub const DOWN: u64 = 6;
    /// The output head (layer = number of layers).
    pub const HEAD: u64 = 7;

    pub fn new(layer: usize, projection: u64) -> Self {
        LinearId(layer as u64 * 16 + projection)
    }
    pub fn layer(self) -> usize {
        (self.0 / 16) as usize
    }
    pub fn projection(self) -> u64 {
        self.0 % 16
    }
}

/// The `linear-kernels` kind.
pub trait LinearKernels: Send + Sync + 'static {
    fn create(config: &str) -> PluginResult<Self>
    where
        Self: Sized;
    /// Register weight `id` (`[out, in]`, row-major); the plugin may copy and repack it.
    fn prepare(&mut self, id: LinearId, weight: &Tensor) -> PluginResult<()>;
    /// `y[n, out] = x[n, in] · W[id]ᵀ`. `cuda` is the host's context and stream on a GPU.
    fn linear(
        &self,
        id: LinearId,
        x: &Tensor,
        y: &Tensor,
        cuda: Option<&abi::CudaContext>,
    ) -> PluginResult<()>;
}

/// The `model-transform` kind (offline; the host streams tensors through it).
pub trait ModelTransform: Send + 'static {
    fn create(config: &str) -> PluginResult<Self>
    where
        Self: Sized;
    /// The plan, as JSON, for the input model described by `model` (JSON; see
    /// [`abi::ModelTransformVTable::plan`]).
    fn plan(&mut self, model: &str) -> PluginResult<String>;
    /// Fill output tensor `index` of the plan from its sources.
    fn produce(&mut self, index: usize, sources: &[Tensor], out: &Tensor) -> PluginResult<()>;
}

/// Box the instance `make` builds from the UTF-8 `config` into `*out` (the `create` of
/// every kind whose constructor takes only its configuration).
///
/// # Safety
/// `out` is writable; `err` is null or valid.
pub unsafe fn create_boxed<T>(
    config: Str,
    out: *mut Handle,
    err: *mut ErrorBuf,
    make: impl FnOnce(&str) -> PluginResult<T>,
) -> Status {
    unsafe {
        guard(err, || {
            let cfg = config
                .as_str()
                .map_err(|e| PluginError::invalid(format!("config is not UTF-8: {e}")))?;
            *out = Box::into_raw(Box::new(make(cfg)?)) as Handle;
            Ok(())
        })
    }
}

/// Drop an instance boxed by a `create` trampoline (the `destroy` of every kind).
///
/// # Safety
/// `h` is null or came from a `create` of `T`, and is not used afterwards.
pub unsafe extern "C" fn destroy_boxed<T>(h: Handle) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
            drop(Box::from_raw(h as *mut T));
        }));
    }
}

/// Trampolines from the C vtable to a [`LinearKernels`] implementation.
pub mod linear_trampolines {
    use super::*;

    /// # Safety
    /// Called by the host with valid pointers.
    pub unsafe extern "C" fn create<T: LinearKernels>(
        config: Str,
        out: *mut Handle,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe { create_boxed(config, out, err, T::create) }
    }

    /// # Safety
    /// `h` came from `create::<T>`; `w` is valid.
    pub unsafe extern "C" fn prepare<T: LinearKernels>(
        h: Handle,
        id: u64,
        w: *const abi::TensorView,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                (*(h as *mut T)).prepare(LinearId(id), &Tensor { raw: *w })
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`; views are valid; `cuda` is null or valid.
    pub unsafe extern "C" fn linear<T: LinearKernels>(
        h: Handle,
        id: u64,
        x: *const abi::TensorView,
        y: *const abi::TensorView,
        cuda: *const abi::CudaContext,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                (*(h as *const T)).linear(
                    LinearId(id),
                    &Tensor { raw: *x },
                    &Tensor { raw: *y },
                    cuda.as_ref(),
                )
            })
        }
    }

    pub const fn vtable<T: LinearKernels>() -> abi::LinearKernelsVTable {
        abi::LinearKernelsVTable {
            create: create::<T>,
            destroy: destroy_boxed::<T>,
            prepare: prepare::<T>,
            linear: linear::<T>,
        }
    }
}

/// Trampolines from the C vtable to a [`ModelTransform`] implementation.
pub mod transform_trampolines {
    use super::*;

    /// # Safety
    /// Called by the host with valid pointers.
    pub unsafe extern "C" fn create<T: ModelTransform>(
        config: Str,
        out: *mut Handle,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe { create_boxed(config, out, err, T::create) }
    }

    /// # Safety
    /// `h` came from `create::<T>`; `out` is a valid host buffer.
    pub unsafe extern "C" fn plan<T: ModelTransform>(
        h: Handle,
        model: Str,
        out: *mut abi::ByteBuf,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                let m = model
                    .as_str()
                    .map_err(|e| PluginError::invalid(format!("model is not UTF-8: {e}")))?;
                let p = (*(h as *mut T)).plan(m)?;
                let o = &mut *out;
                o.len = p.len();
                if p.len() > o.cap {
                    return Err(PluginError::exhausted(format!(
                        "plan needs {} bytes",
                        p.len()
                    )));
                }
                std::ptr::copy_nonoverlapping(p.as_ptr(), o.ptr, p.len());
                Ok(())
            })
        }
    }

    /// # Safety
    /// `h` came from `create::<T>`; views are valid.
    pub unsafe extern "C" fn produce<T: ModelTransform>(
        h: Handle,
        index: u64,
        sources: *const abi::TensorView,
        n_sources: u64,
        out: *const abi::TensorView,
        err: *mut ErrorBuf,
    ) -> Status {
        unsafe {
            guard(err, || {
                let src: Vec<Tensor> = if n_sources == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(sources, n_sources as usize)
                        .iter()
                        .map(|r| Tensor { raw: *r })
                        .collect()
                };
                (*(h as *mut T)).produce(index as usize, &src, &Tensor { raw: *out })
            })
        }
    }

    pub const fn vtable<T: ModelTransform>() -> abi::ModelTransformVTable {
        abi::ModelTransformVTable {
            create: create::<T>,
            destroy: destroy_boxed::<T>,
            plan: plan::<T>,
            produce: produce::<T>,
        }
    }
}

/// Export the descriptor and root symbol for a vtable (used by the `export_*` macros).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($vt_ty:ty, $vt:expr, $kind:expr, $name:expr, $version:expr, $features:expr) => {
        static SWITCHYARD_VTABLE: $vt_ty = $vt;
        static SWITCHYARD_DESCRIPTOR: $crate::abi::PluginDescriptor =
            $crate::abi::PluginDescriptor {
                abi_major: $crate::abi::ABI_MAJOR,
                abi_minor: $crate::abi::ABI_MINOR,
                kind: $kind,
                name: $crate::abi::Str::new($name),
                version: $crate::abi::Str::new($version),
                features: $features,
                vtable: &SWITCHYARD_VTABLE as *const $vt_ty as *const ::std::ffi::c_void,
                vtable_size: ::std::mem::size_of::<$vt_ty>(),
            };
        /// The plugin's root symbol.
        #[no_mangle]
        pub extern "C" fn switchyard_plugin_v1() -> *const $crate::abi::PluginDescriptor {
            &SWITCHYARD_DESCRIPTOR
        }
    };
}

/// Export a [`LinearKernels`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_linear_kernels {
    ($ty:ty, name = $name:expr, version = $version:expr) => {
        $crate::export_linear_kernels!($ty, name = $name, version = $version, features = 0);
    };
    ($ty:ty, name = $name:expr, version = $version:expr, features = $features:expr) => {
        $crate::__export_plugin!(
            $crate::abi::LinearKernelsVTable,
            $crate::linear_trampolines::vtable::<$ty>(),
            $crate::abi::kind::LINEAR_KERNELS,
            $name,
            $version,
            $features
        );
    };
}

/// Export a [`ModelTransform`] implementation as this library's plugin.
#[macro_export]
macro_rules! export_model_transform {
    ($ty:ty, name = $name:expr, version = $version:expr) => {
        $crate::export_model_transform!($ty, name = $name, version = $version, features = 0);
    };
    ($ty:ty, name = $name:expr, version = $version:expr, features = $features:expr) => {
        $crate::__export_plugin!(
            $crate::abi::ModelTransformVTable,
            $crate::transform_trampolines::vtable::<$ty>(),
            $crate::abi::kind::MODEL_TRANSFORM,
            $name,
            $version,
            $features
        );
    };
}
