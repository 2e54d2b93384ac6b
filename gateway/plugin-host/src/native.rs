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
        abi::kind::KV_ALLOCATOR => abi::KvAllocatorVTable::SIZE_1_0,
        abi::kind::LINEAR_KERNELS => std::mem::size_of::<abi::LinearKernelsVTable>(),
        abi::kind::MODEL_TRANSFORM => std::mem::size_of::<abi::ModelTransformVTable>(),
        k => return Err(hs(format!("unknown plugin kind {k}"))),
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
        // ABI 1.0 plugins have no `page_stats`; never read past their vtable.
        let page_stats =
            (self.desc.vtable_size >= abi::KvAllocatorVTable::SIZE_1_1).then_some(vt.page_stats);
        Ok(NativeKvAllocator {
            vt,
            page_stats,
            h,
            layout,
            name: self.name.clone(),
            err: buf,
            observer: None,
        })
    }
}

/// A plugin's KV allocator behind the engine's [`KvAllocator`] trait.
pub struct NativeKvAllocator {
    vt: &'static abi::KvAllocatorVTable,
    page_stats: Option<unsafe extern "C" fn(abi::Handle, *mut abi::KvPageStatsC) -> abi::Status>,
    h: *mut c_void,
    layout: KvLayout,
    name: String,
    err: Vec<u8>,
    observer: Option<std::sync::Arc<dyn crate::CallObserver>>,
}

// SAFETY: the SDK requires KvAllocator implementations to be Send; the handle is used from
// one thread at a time (&mut self).
unsafe impl Send for NativeKvAllocator {}

impl NativeKvAllocator {
    /// Report acquire/ensure/release calls (duration and outcome) to `o`.
    pub fn with_observer(mut self, o: std::sync::Arc<dyn crate::CallObserver>) -> Self {
        self.observer = Some(o);
        self
    }

    fn observe(&self, op: &str, t0: std::time::Instant, st: abi::Status) {
        if let Some(o) = &self.observer {
            let outcome = match st {
                abi::Status::OK => crate::CallOutcome::Ok,
                abi::Status::PANIC => crate::CallOutcome::Trap,
                _ => crate::CallOutcome::Error,
            };
            o.call(&self.name, op, t0.elapsed(), outcome);
        }
    }

    fn check(
        &mut self,
        op: &str,
        f: impl FnOnce(&mut abi::ErrorBuf) -> abi::Status,
    ) -> EngineResult<()> {
        let mut eb = abi::ErrorBuf {
            ptr: self.err.as_mut_ptr(),
            cap: self.err.len(),
            len: 0,
        };
        let t0 = std::time::Instant::now();
        let st = f(&mut eb);
        self.observe(op, t0, st);
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
        self.check("acquire", |eb| unsafe { (vt.acquire)(h, &mut slot, eb) })?;
        Ok(slot as usize)
    }
    fn ensure(&mut self, slot: usize, n_tokens: usize) -> EngineResult<()> {
        let (vt, h) = (self.vt, self.h);
        // SAFETY: valid handle and pointers.
        self.check("ensure", |eb| unsafe {
            (vt.ensure)(h, slot as u64, n_tokens as u64, eb)
        })
    }
    fn capacity(&self, slot: usize) -> usize {
        // SAFETY: valid handle.
        unsafe { (self.vt.capacity)(self.h, slot as u64) as usize }
    }
    fn release(&mut self, slot: usize) {
        let t0 = std::time::Instant::now();
        // SAFETY: valid handle.
        unsafe { (self.vt.release)(self.h, slot as u64) };
        self.observe("release", t0, abi::Status::OK);
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
            pages: self.page_stats.and_then(|f| {
                let mut p = abi::KvPageStatsC::default();
                // SAFETY: valid handle and out pointer; present since ABI 1.1.
                let st = unsafe { f(self.h, &mut p) };
                st.is_ok().then_some(switchyard_engine::kv::PageStats {
                    page_bytes: p.page_bytes,
                    mapped: p.pages_mapped,
                    unmapped: p.pages_unmapped,
                    sync_map_ns: p.sync_map_ns,
                    sync_maps: p.sync_maps,
                    ahead_map_ns: p.ahead_map_ns,
                })
            }),
        }
    }
    fn name(&self) -> &str {
        &self.name
    }
}

fn err_buf(buf: &mut [u8]) -> abi::ErrorBuf {
    abi::ErrorBuf {
        ptr: buf.as_mut_ptr(),
        cap: buf.len(),
        len: 0,
    }
}

fn f32_view(data: *const f32, shape: &[usize]) -> abi::TensorView {
    abi::TensorView::dense_f32(data, shape)
}

impl NativePlugin {
    fn vtable_of<T>(&self, kind: u32) -> Result<&'static T> {
        if self.kind != kind {
            return Err(HostError::Call {
                name: self.name.clone(),
                msg: format!(
                    "is a {} plugin, not a {}",
                    abi::kind::name(self.kind),
                    abi::kind::name(kind)
                ),
            });
        }
        // SAFETY: kind and vtable size were checked at load.
        Ok(unsafe { &*(self.desc.vtable as *const T) })
    }

    fn create_with(
        &self,
        f: impl FnOnce(&mut abi::Handle, &mut abi::ErrorBuf) -> abi::Status,
    ) -> Result<abi::Handle> {
        let mut buf = vec![0u8; ERR_CAP];
        let mut eb = err_buf(&mut buf);
        let mut h: abi::Handle = std::ptr::null_mut();
        let st = f(&mut h, &mut eb);
        if !st.is_ok() || h.is_null() {
            return Err(HostError::Call {
                name: self.name.clone(),
                msg: call_err(&self.name, st, &buf, eb.len),
            });
        }
        Ok(h)
    }

    /// A new instance of a `linear-kernels` plugin.
    pub fn linear_kernels(&self, config: &str) -> Result<NativeLinearKernels> {
        let vt: &'static abi::LinearKernelsVTable = self.vtable_of(abi::kind::LINEAR_KERNELS)?;
        // SAFETY: valid pointers for the call.
        let h =
            self.create_with(|h, eb| unsafe { (vt.create)(abi::Str::borrow(config), h, eb) })?;
        Ok(NativeLinearKernels {
            vt,
            h,
            name: self.name.clone(),
        })
    }

    /// A new instance of a `model-transform` plugin.
    pub fn model_transform(&self, config: &str) -> Result<NativeModelTransform> {
        let vt: &'static abi::ModelTransformVTable = self.vtable_of(abi::kind::MODEL_TRANSFORM)?;
        // SAFETY: valid pointers for the call.
        let h =
            self.create_with(|h, eb| unsafe { (vt.create)(abi::Str::borrow(config), h, eb) })?;
        Ok(NativeModelTransform {
            vt,
            h,
            name: self.name.clone(),
        })
    }
}

fn check(name: &str, f: impl FnOnce(&mut abi::ErrorBuf) -> abi::Status) -> EngineResult<()> {
    let mut buf = [0u8; ERR_CAP];
    let mut eb = err_buf(&mut buf);
    let st = f(&mut eb);
    if st.is_ok() {
        Ok(())
    } else {
        Err(EngineError::Invalid(call_err(name, st, &buf, eb.len)))
    }
}

/// An instance of a `linear-kernels` plugin (f32 on the CPU through this wrapper).
pub struct NativeLinearKernels {
    vt: &'static abi::LinearKernelsVTable,
    h: abi::Handle,
    name: String,
}

// SAFETY: the SDK requires LinearKernels to be Send + Sync.
unsafe impl Send for NativeLinearKernels {}
unsafe impl Sync for NativeLinearKernels {}

impl Drop for NativeLinearKernels {
    fn drop(&mut self) {
        // SAFETY: the handle came from create and is dropped once.
        unsafe { (self.vt.destroy)(self.h) };
    }
}

impl NativeLinearKernels {
    /// Register weight `id`: `w` is `[out, inp]` row-major f32.
    pub fn prepare(&mut self, id: u64, w: &[f32], out: usize, inp: usize) -> EngineResult<()> {
        if w.len() != out * inp {
            return Err(EngineError::Invalid(format!(
                "weight of {} values is not {out} x {inp}",
                w.len()
            )));
        }
        let v = f32_view(w.as_ptr(), &[out, inp]);
        let (vt, h) = (self.vt, self.h);
        // SAFETY: the view is valid for the call.
        check(&self.name, |eb| unsafe { (vt.prepare)(h, id, &v, eb) })
    }

    /// `y[n, out] = x[n, inp] · W[id]ᵀ`.
    pub fn linear(
        &self,
        id: u64,
        x: &[f32],
        n: usize,
        inp: usize,
        y: &mut [f32],
        out: usize,
    ) -> EngineResult<()> {
        if x.len() != n * inp || y.len() != n * out {
            return Err(EngineError::Invalid("linear: shapes do not match".into()));
        }
        let xv = f32_view(x.as_ptr(), &[n, inp]);
        let yv = f32_view(y.as_mut_ptr(), &[n, out]);
        let (vt, h) = (self.vt, self.h);
        // SAFETY: views valid for the call; y is not read meanwhile.
        check(&self.name, |eb| unsafe {
            (vt.linear)(h, id, &xv, &yv, std::ptr::null(), eb)
        })
    }
}

/// An instance of a `model-transform` plugin.
pub struct NativeModelTransform {
    vt: &'static abi::ModelTransformVTable,
    h: abi::Handle,
    name: String,
}

// SAFETY: the SDK requires ModelTransform to be Send; used through &mut self.
unsafe impl Send for NativeModelTransform {}

impl Drop for NativeModelTransform {
    fn drop(&mut self) {
        // SAFETY: the handle came from create and is dropped once.
        unsafe { (self.vt.destroy)(self.h) };
    }
}

impl NativeModelTransform {
    /// The plan (JSON) for the input model `model` (JSON).
    pub fn plan(&mut self, model: &str) -> EngineResult<String> {
        let mut cap = 64 << 10;
        loop {
            let mut out = vec![0u8; cap];
            let mut bb = abi::ByteBuf {
                ptr: out.as_mut_ptr(),
                cap,
                len: 0,
            };
            let mut buf = [0u8; ERR_CAP];
            let mut eb = err_buf(&mut buf);
            // SAFETY: valid pointers for the call.
            let st = unsafe { (self.vt.plan)(self.h, abi::Str::borrow(model), &mut bb, &mut eb) };
            if st == abi::Status::EXHAUSTED && bb.len > cap {
                cap = bb.len;
                continue;
            }
            if !st.is_ok() {
                return Err(EngineError::Invalid(call_err(&self.name, st, &buf, eb.len)));
            }
            out.truncate(bb.len);
            return String::from_utf8(out).map_err(|_| {
                EngineError::Invalid(format!("plugin {}: plan is not UTF-8", self.name))
            });
        }
    }

    /// Fill output tensor `index` (f32 `out_shape`) from f32 sources.
    pub fn produce(
        &mut self,
        index: usize,
        sources: &[(&[f32], &[usize])],
        out: &mut [f32],
        out_shape: &[usize],
    ) -> EngineResult<()> {
        let src: Vec<abi::TensorView> = sources
            .iter()
            .map(|(d, s)| f32_view(d.as_ptr(), s))
            .collect();
        let ov = f32_view(out.as_mut_ptr(), out_shape);
        let (vt, h) = (self.vt, self.h);
        // SAFETY: views valid for the call.
        check(&self.name, |eb| unsafe {
            (vt.produce)(h, index as u64, src.as_ptr(), src.len() as u64, &ov, eb)
        })
    }
}

/// A `linear-kernels` plugin instance holding every projection of one model: what the
/// engine's forward pass calls in place of its own products.
pub struct ModelLinear {
    k: NativeLinearKernels,
    /// Per layer, (out, in) of each projection.
    shapes: Vec<[(usize, usize); 7]>,
}

impl ModelLinear {
    /// Register the seven projections of every layer of `m` (as f32) with `k`;
    /// `progress(layers done, total)`.
    pub fn prepare(
        mut k: NativeLinearKernels,
        m: &switchyard_engine::model::Model,
        progress: &mut dyn FnMut(usize, usize),
    ) -> EngineResult<Self> {
        use switchyard_engine::linear::proj;
        let mut shapes = Vec::with_capacity(m.layers.len());
        for (li, l) in m.layers.iter().enumerate() {
            let ws = [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down];
            let mut sh = [(0, 0); 7];
            for (p, w) in ws.iter().enumerate() {
                let id = li as u64 * 16 + p as u64;
                k.prepare(id, &w.to_f32(), w.rows, w.cols).map_err(|e| {
                    EngineError::Invalid(format!("preparing layer {li} {}: {e}", proj::NAMES[p]))
                })?;
                sh[p] = (w.rows, w.cols);
            }
            shapes.push(sh);
            progress(li + 1, m.layers.len());
        }
        Ok(Self { k, shapes })
    }
}

impl switchyard_engine::linear::LinearKernels for ModelLinear {
    fn name(&self) -> &str {
        &self.k.name
    }

    fn linear(
        &self,
        layer: usize,
        projection: u64,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> EngineResult<()> {
        let (out, inp) = self
            .shapes
            .get(layer)
            .and_then(|s| s.get(projection as usize))
            .copied()
            .ok_or_else(|| {
                EngineError::Invalid(format!("no projection {projection} in layer {layer}"))
            })?;
        self.k
            .linear(layer as u64 * 16 + projection, x, n, inp, y, out)
    }
}
