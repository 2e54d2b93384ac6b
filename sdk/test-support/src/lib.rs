//! What a plugin author runs in their own `cargo test`: the checks the Switchyard host makes
//! when it loads a native plugin (the ABI handshake), and conformance suites per kind that
//! drive the plugin the way the engine does, both on the Rust type directly and through the
//! exported C ABI (the same calls, status codes and error buffers the host uses).
//!
//! ```ignore
//! #[test]
//! fn conformance() {
//!     use switchyard_plugin_test_support as ts;
//!     ts::kv_allocator::conformance::<MyKv>("", ts::kv_allocator::small_layout());
//!     ts::kv_allocator::conformance_abi(switchyard_plugin_v1, "", ts::kv_allocator::small_layout());
//! }
//! ```
//!
//! Depends on nothing but the SDK.

use switchyard_plugin::abi;

/// What a plugin's descriptor says, after the host's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub kind: String,
    pub name: String,
    pub version: String,
    pub abi: (u32, u32),
    pub features: u64,
}

/// The root function an exported plugin defines (`switchyard_plugin_v1`).
pub type Root = extern "C" fn() -> *const abi::PluginDescriptor;

/// Run the host's handshake on a root function: a descriptor, equal ABI majors, a minor no
/// newer than this SDK's, a known kind, UTF-8 strings, and a vtable at least as large as the
/// host needs.
pub fn root_descriptor(root: Root) -> Result<Described, String> {
    let d = root();
    if d.is_null() {
        return Err("the root symbol returned no descriptor".into());
    }
    // SAFETY: the export macro returns a pointer to a static descriptor.
    let d = unsafe { &*d };
    if d.abi_major != abi::ABI_MAJOR || d.abi_minor > abi::ABI_MINOR {
        return Err(format!(
            "plugin ABI {}.{} is not accepted by a {}.{} host",
            d.abi_major,
            d.abi_minor,
            abi::ABI_MAJOR,
            abi::ABI_MINOR
        ));
    }
    let need = match d.kind {
        abi::kind::KV_ALLOCATOR => abi::KvAllocatorVTable::SIZE_1_0,
        abi::kind::LINEAR_KERNELS => std::mem::size_of::<abi::LinearKernelsVTable>(),
        abi::kind::MODEL_TRANSFORM => std::mem::size_of::<abi::ModelTransformVTable>(),
        k => return Err(format!("unknown plugin kind {k}")),
    };
    if d.vtable.is_null() || d.vtable_size < need {
        return Err(format!(
            "vtable of {} bytes, the host needs {need}",
            d.vtable_size
        ));
    }
    // SAFETY: descriptor strings are statics of the plugin.
    let s = |x: &abi::Str, what: &str| {
        unsafe { x.as_str() }
            .map(str::to_string)
            .map_err(|_| format!("descriptor {what} is not UTF-8"))
    };
    let name = s(&d.name, "name")?;
    if name.is_empty() {
        return Err("descriptor name is empty".into());
    }
    Ok(Described {
        kind: abi::kind::name(d.kind).to_string(),
        name,
        version: s(&d.version, "version")?,
        abi: (d.abi_major, d.abi_minor),
        features: d.features,
    })
}

pub mod kv_allocator {
    //! Conformance of `kv-allocator` plugins.

    use super::*;
    use switchyard_plugin::{KvAllocator, KvLayout, KvStats};

    /// A layout small enough for quick tests: 2 layers, 2 heads of 4, context 64, 3 slots.
    pub fn small_layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            kv_heads: 2,
            head_dim: 4,
            max_context: 64,
            max_slots: 3,
        }
    }

    /// The operations the engine performs (on the type, or through the C ABI).
    pub trait KvOps {
        fn acquire(&mut self) -> Result<usize, String>;
        fn ensure(&mut self, slot: usize, n: usize) -> Result<(), String>;
        fn capacity(&self, slot: usize) -> usize;
        fn release(&mut self, slot: usize);
        fn kv(&mut self, layer: usize, slot: usize) -> Result<(*mut f32, *mut f32), String>;
        fn stats(&self) -> KvStats;
    }

    struct Direct<T>(T);

    impl<T: KvAllocator> KvOps for Direct<T> {
        fn acquire(&mut self) -> Result<usize, String> {
            self.0.acquire().map_err(|e| e.message)
        }
        fn ensure(&mut self, slot: usize, n: usize) -> Result<(), String> {
            self.0.ensure(slot, n).map_err(|e| e.message)
        }
        fn capacity(&self, slot: usize) -> usize {
            self.0.capacity(slot)
        }
        fn release(&mut self, slot: usize) {
            self.0.release(slot)
        }
        fn kv(&mut self, layer: usize, slot: usize) -> Result<(*mut f32, *mut f32), String> {
            self.0.kv(layer, slot).map_err(|e| e.message)
        }
        fn stats(&self) -> KvStats {
            self.0.stats()
        }
    }

    /// A plugin instance driven through its C vtable, as the host drives it.
    pub struct Abi {
        vt: &'static abi::KvAllocatorVTable,
        h: abi::Handle,
        err: Vec<u8>,
    }

    impl Drop for Abi {
        fn drop(&mut self) {
            // SAFETY: the handle came from create.
            unsafe { (self.vt.destroy)(self.h) }
        }
    }

    fn status(st: abi::Status, buf: &[u8], len: usize) -> Result<(), String> {
        if st.is_ok() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&buf[..len.min(buf.len())]).into_owned();
        if msg.is_empty() {
            return Err(format!(
                "status {} without an error message (every failing call must say why)",
                st.0
            ));
        }
        Err(format!("status {}: {msg}", st.0))
    }

    impl Abi {
        /// `create` through the vtable of `root`'s plugin.
        pub fn create(root: Root, config: &str, layout: KvLayout) -> Result<Abi, String> {
            let d = root_descriptor(root)?;
            if d.kind != "kv-allocator" {
                return Err(format!("a {} plugin, not a kv-allocator", d.kind));
            }
            // SAFETY: checked kind and vtable size.
            let vt = unsafe { &*((*root()).vtable as *const abi::KvAllocatorVTable) };
            let l = abi::KvLayoutC {
                n_layers: layout.n_layers as u64,
                kv_heads: layout.kv_heads as u64,
                head_dim: layout.head_dim as u64,
                max_context: layout.max_context as u64,
                max_slots: layout.max_slots as u64,
            };
            let mut err = vec![0u8; 1024];
            let mut eb = abi::ErrorBuf {
                ptr: err.as_mut_ptr(),
                cap: err.len(),
                len: 0,
            };
            let mut h: abi::Handle = std::ptr::null_mut();
            // SAFETY: valid pointers for the call.
            let st = unsafe { (vt.create)(abi::Str::borrow(config), &l, &mut h, &mut eb) };
            status(st, &err, eb.len)?;
            if h.is_null() {
                return Err("create succeeded but returned no handle".into());
            }
            Ok(Abi { vt, h, err })
        }

        fn call(
            &mut self,
            f: impl FnOnce(&mut abi::ErrorBuf) -> abi::Status,
        ) -> Result<(), String> {
            let mut eb = abi::ErrorBuf {
                ptr: self.err.as_mut_ptr(),
                cap: self.err.len(),
                len: 0,
            };
            let st = f(&mut eb);
            status(st, &self.err, eb.len)
        }
    }

    impl KvOps for Abi {
        fn acquire(&mut self) -> Result<usize, String> {
            let (vt, h) = (self.vt, self.h);
            let mut s = 0u64;
            // SAFETY: valid handle and pointers.
            self.call(|eb| unsafe { (vt.acquire)(h, &mut s, eb) })?;
            Ok(s as usize)
        }
        fn ensure(&mut self, slot: usize, n: usize) -> Result<(), String> {
            let (vt, h) = (self.vt, self.h);
            // SAFETY: valid handle and pointers.
            self.call(|eb| unsafe { (vt.ensure)(h, slot as u64, n as u64, eb) })
        }
        fn capacity(&self, slot: usize) -> usize {
            // SAFETY: valid handle.
            unsafe { (self.vt.capacity)(self.h, slot as u64) as usize }
        }
        fn release(&mut self, slot: usize) {
            // SAFETY: valid handle.
            unsafe { (self.vt.release)(self.h, slot as u64) }
        }
        fn kv(&mut self, layer: usize, slot: usize) -> Result<(*mut f32, *mut f32), String> {
            let (mut k, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
            // SAFETY: valid handle and out pointers.
            let st = unsafe { (self.vt.kv)(self.h, layer as u64, slot as u64, &mut k, &mut v) };
            if !st.is_ok() {
                return Err(format!("kv failed with status {}", st.0));
            }
            Ok((k, v))
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
    }

    /// The error message of a `create` that must fail.
    pub fn create_err<T: KvAllocator>(config: &str, layout: KvLayout) -> String {
        match T::create(config, layout) {
            Ok(_) => panic!("create({config:?}) succeeded, but it should fail"),
            Err(e) => {
                assert!(
                    !e.message.is_empty(),
                    "create({config:?}) failed without a message"
                );
                e.message
            }
        }
    }

    /// The suite on the Rust type.
    pub fn conformance<T: KvAllocator>(config: &str, layout: KvLayout) {
        let kv = T::create(config, layout)
            .unwrap_or_else(|e| panic!("create({config:?}) failed: {}", e.message));
        run(&mut Direct(kv), layout);
    }

    /// The suite through the exported C ABI of `root` (what the host calls).
    pub fn conformance_abi(root: Root, config: &str, layout: KvLayout) {
        let mut kv = Abi::create(root, config, layout).unwrap_or_else(|e| panic!("{e}"));
        run(&mut kv, layout);
    }

    fn value(slot: usize, layer: usize, t: usize, i: usize, v: bool) -> f32 {
        (slot * 1_000_000 + layer * 10_000 + t * 10 + i % 10) as f32 + if v { 0.5 } else { 0.0 }
    }

    /// Write a pattern into `slot`'s tokens `from..to`, in every layer.
    fn write(kv: &mut dyn KvOps, l: KvLayout, slot: usize, from: usize, to: usize) {
        let e = l.token_elems();
        for layer in 0..l.n_layers {
            let (k, v) = kv.kv(layer, slot).unwrap_or_else(|e| panic!("kv: {e}"));
            assert!(!k.is_null() && !v.is_null(), "kv returned a null pointer");
            for t in from..to {
                for i in 0..e {
                    // SAFETY: the contract: capacity × token_elems f32 per layer.
                    unsafe {
                        *k.add(t * e + i) = value(slot, layer, t, i, false);
                        *v.add(t * e + i) = value(slot, layer, t, i, true);
                    }
                }
            }
        }
    }

    fn check(kv: &mut dyn KvOps, l: KvLayout, slot: usize, to: usize) {
        let e = l.token_elems();
        for layer in 0..l.n_layers {
            let (k, v) = kv.kv(layer, slot).unwrap_or_else(|e| panic!("kv: {e}"));
            for t in 0..to {
                for i in 0..e {
                    // SAFETY: as in write.
                    let (a, b) = unsafe { (*k.add(t * e + i), *v.add(t * e + i)) };
                    assert_eq!(
                        (a, b),
                        (
                            value(slot, layer, t, i, false),
                            value(slot, layer, t, i, true)
                        ),
                        "slot {slot} layer {layer} token {t} elem {i}: K/V lost or overwritten"
                    );
                }
            }
        }
    }

    /// The engine's pattern: acquire, grow a token at a time and in chunks, keep what was
    /// written across growth, isolate slots, run out of slots with an error, release and
    /// reuse, refuse growth past the context, keep stats consistent.
    pub fn run(kv: &mut dyn KvOps, l: KvLayout) {
        assert_eq!(
            kv.stats().slots_in_use,
            0,
            "a new allocator has no slots in use"
        );
        let mut slots = Vec::new();
        loop {
            match kv.acquire() {
                Ok(s) => {
                    assert!(!slots.contains(&s), "slot {s} handed out twice");
                    slots.push(s);
                    assert!(slots.len() <= l.max_slots, "more slots than max_slots");
                }
                Err(e) => {
                    assert!(!e.is_empty());
                    break;
                }
            }
        }
        assert!(!slots.is_empty(), "acquire never succeeded");
        assert_eq!(kv.stats().slots_in_use, slots.len());
        // Grow every slot in steps (prefill chunk, then decode tokens), interleaved.
        let mut len = vec![0usize; slots.len()];
        let steps = [7usize, 1, 1, 9, 1, 16, 1, 1, 20];
        for &n in &steps {
            for (j, &s) in slots.iter().enumerate() {
                let to = (len[j] + n + j).min(l.max_context);
                kv.ensure(s, to)
                    .unwrap_or_else(|e| panic!("ensure({s}, {to}): {e}"));
                assert!(kv.capacity(s) >= to, "capacity below what ensure promised");
                write(kv, l, s, len[j], to);
                len[j] = to;
            }
            for (j, &s) in slots.iter().enumerate() {
                check(kv, l, s, len[j]);
            }
        }
        // The whole context fits; one more token does not.
        let s0 = slots[0];
        kv.ensure(s0, l.max_context)
            .unwrap_or_else(|e| panic!("ensure to max_context: {e}"));
        check(kv, l, s0, len[0]);
        assert!(
            kv.ensure(s0, l.max_context + 1).is_err(),
            "ensure past max_context must fail"
        );
        // Release one, reuse it; the others keep their data.
        let s1 = *slots.last().unwrap();
        kv.release(s1);
        assert_eq!(kv.stats().slots_in_use, slots.len() - 1);
        let again = kv
            .acquire()
            .unwrap_or_else(|e| panic!("acquire after release: {e}"));
        kv.ensure(again, 5).unwrap();
        write(kv, l, again, 0, 5);
        for (j, &s) in slots.iter().enumerate() {
            if s != s1 {
                check(kv, l, s, len[j]);
            }
        }
        check(kv, l, again, 5);
        for &s in &slots {
            if s != s1 {
                kv.release(s);
            }
        }
        kv.release(again);
        assert_eq!(kv.stats().slots_in_use, 0, "all slots released");
    }
}

pub mod linear_kernels {
    //! Conformance of `linear-kernels` plugins: results against a dense f64 reference on
    //! random inputs at many shapes, through the Rust type.

    use switchyard_plugin::{LinearId, LinearKernels, Tensor};

    /// A small deterministic generator (no dependencies).
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next_f32()).collect()
        }
    }

    /// `y = x · Wᵀ` in f64.
    pub fn reference(x: &[f32], w: &[f32], n: usize, inp: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * out];
        for r in 0..n {
            for o in 0..out {
                let mut acc = 0f64;
                for i in 0..inp {
                    acc += x[r * inp + i] as f64 * w[o * inp + i] as f64;
                }
                y[r * out + o] = acc as f32;
            }
        }
        y
    }

    /// Shapes (n, in, out) the suite runs: odd sizes, one row, many rows, wide and tall.
    pub const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 3),
        (3, 64, 64),
        (1, 576, 192),
        (5, 129, 257),
        (16, 96, 40),
    ];

    /// Every shape in [`SHAPES`], relative error at most 1e-4 of the row's magnitude.
    pub fn conformance<T: LinearKernels>(config: &str) {
        let mut k = T::create(config)
            .unwrap_or_else(|e| panic!("create({config:?}) failed: {}", e.message));
        let mut rng = Rng(42);
        let mut cases = Vec::new();
        for (j, &(n, inp, out)) in SHAPES.iter().enumerate() {
            let w = rng.vec(out * inp);
            let id = LinearId::new(j, LinearId::Q);
            k.prepare(id, &Tensor::from_f32(&w, &[out, inp]))
                .unwrap_or_else(|e| panic!("prepare {n}x{inp}x{out}: {}", e.message));
            cases.push((id, n, inp, out, w));
        }
        for (id, n, inp, out, w) in &cases {
            let x = rng.vec(n * inp);
            let y = vec![f32::NAN; n * out];
            k.linear(
                *id,
                &Tensor::from_f32(&x, &[*n, *inp]),
                &Tensor::from_f32(&y, &[*n, *out]),
                None,
            )
            .unwrap_or_else(|e| panic!("linear {n}x{inp}x{out}: {}", e.message));
            let want = reference(&x, w, *n, *inp, *out);
            let scale = (*inp as f32).sqrt();
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale.max(1.0),
                    "shape {n}x{inp}x{out}, element {i}: {a} vs reference {b}"
                );
            }
        }
        // An id that was never prepared is an error, not a crash.
        let x = [0f32; 4];
        let y = [0f32; 4];
        assert!(k
            .linear(
                LinearId::new(999, 0),
                &Tensor::from_f32(&x, &[1, 4]),
                &Tensor::from_f32(&y, &[1, 4]),
                None
            )
            .is_err());
    }
}
