//! Tensor element types (GGML numbering), dequantization, and the dot-product kernels.
//!
//! Activations stay f32 on every path: quantized weights are expanded exactly to f32 inside
//! the dot product, so results match a reference that dequantizes the weights first.
//! Q4_0/Q4_1 use the identity Σ(d·q+m)·x = d·Σq·x + m·Σx with Σx precomputed per 32-block
//! once per input vector ([`block_sums`]).

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    BF16,
    /// Q4_1 rearranged per row for SIMD: [d f16 × nb][m f16 × nb][nibbles 16 B × nb]
    /// (same bytes, same values; built at load by [`split_row`]).
    Q4_1S,
    /// Q8_0 rearranged per row: [d f16 × nb][int8 32 B × nb].
    Q8_0S,
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4K => "Q4_K",
            Self::Q6K => "Q6_K",
            Self::BF16 => "BF16",
            Self::Q4_1S => "Q4_1",
            Self::Q8_0S => "Q8_0",
        }
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 | Self::Q4_1S | Self::Q8_0S => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 | Self::Q4_1S => 20,
            Self::Q8_0 | Self::Q8_0S => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }
}

/// Names of the GGML types this engine does not run, for error messages.
pub fn ggml_type_name(v: u32) -> Option<&'static str> {
    Some(match v {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        13 => "Q5_K",
        15 => "Q8_K",
        16..=23 => "IQ (i-quant)",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The split layout of a Q4_1 or Q8_0 row (scales first, then quantized values), which the
/// AVX-512 kernels read with wide loads and no per-block f16 conversion.
pub fn split_type(ty: GgmlType) -> Option<GgmlType> {
    match ty {
        GgmlType::Q4_1 => Some(GgmlType::Q4_1S),
        GgmlType::Q8_0 => Some(GgmlType::Q8_0S),
        _ => None,
    }
}

/// Rearrange one row into its split layout (see [`split_type`]).
pub fn split_row(ty: GgmlType, row: &[u8], out: &mut Vec<u8>) {
    let bb = ty.block_bytes();
    let nb = row.len() / bb;
    let scales = if ty == GgmlType::Q4_1 { 2 } else { 1 };
    for k in 0..scales {
        for b in row.chunks_exact(bb) {
            out.extend_from_slice(&b[2 * k..2 * k + 2]);
        }
    }
    for b in row.chunks_exact(bb) {
        out.extend_from_slice(&b[2 * scales..]);
    }
    debug_assert_eq!(out.len() % (nb * bb), 0);
}

/// Dequantize one row of `cols` elements into `out` (exact: f16/bf16/scaled ints → f32).
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    let n = out.len();
    #[cfg(target_arch = "x86_64")]
    if matches!(ty, GgmlType::Q4_1S | GgmlType::Q8_0S) && simd512::available() {
        // SAFETY: AVX-512 availability checked above.
        unsafe {
            if ty == GgmlType::Q4_1S {
                simd512::dequant_q4_1s(row, out);
            } else {
                simd512::dequant_q8_0s(row, out);
            }
        }
        return;
    }
    match ty {
        GgmlType::Q4_1S => {
            let nb = n / 32;
            for b in 0..nb {
                let d = f16_at(row, 2 * b);
                let m = f16_at(row, 2 * nb + 2 * b);
                let q = &row[4 * nb + 16 * b..4 * nb + 16 * b + 16];
                for j in 0..16 {
                    out[32 * b + j] = d * (q[j] & 0xF) as f32 + m;
                    out[32 * b + j + 16] = d * (q[j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0S => {
            let nb = n / 32;
            for b in 0..nb {
                let d = f16_at(row, 2 * b);
                for j in 0..32 {
                    out[32 * b + j] = d * (row[2 * nb + 32 * b + j] as i8) as f32;
                }
            }
        }
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in row.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 0xF) as i32 - 8) as f32;
                    o[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 0xF) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, o) in row.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (k, j) in (0..256).step_by(64).enumerate() {
                    let is = 2 * k;
                    let (sc1, m1) = scale_min_k4(is, scales);
                    let (sc2, m2) = scale_min_k4(is + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[k * 32..k * 32 + 32];
                    for l in 0..32 {
                        o[j + l] = d1 * (q[l] & 0xF) as f32 - m1;
                        o[j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[half * 64..half * 64 + 64];
                    let qh = &b[128 + half * 32..128 + half * 32 + 32];
                    let sc = &b[192 + half * 8..192 + half * 8 + 8];
                    let y = &mut o[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
    debug_assert_eq!(n % ty.block_size(), 0);
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Σx over each 32-element block of `x` (used by the Q4_0/Q4_1 dot products).
/// Appends to `out`, so the sums of several vectors can be laid out one after another.
pub fn block_sums(x: &[f32], out: &mut Vec<f32>) {
    out.extend(x.chunks_exact(32).map(|c| c.iter().sum::<f32>()));
}

/// Which dot products can run directly on the quantized row (without dequantizing first).
pub fn has_fused_dot(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(ty, GgmlType::Q4_1S | GgmlType::Q8_0S) {
        return simd512::available();
    }
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q4_1
    )
}

/// Dot product of one stored row with f32 `x`. `xsum` holds [`block_sums`] of `x`.
#[inline]
pub fn dot_row(ty: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd512::available() {
        // SAFETY: the required CPU features were detected at run time.
        unsafe {
            match ty {
                GgmlType::Q4_1S => return simd512::dot_q4_1s(row, x, xsum),
                GgmlType::Q8_0S => return simd512::dot_q8_0s(row, x),
                GgmlType::F32 => return simd512::dot_f32_bytes(row, x),
                _ => {}
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: the required CPU features were detected at run time.
        // Types without an AVX2 kernel (the split layouts on a machine without AVX-512)
        // fall through to the scalar path, which dequantizes.
        unsafe {
            match ty {
                GgmlType::F32 => return simd::dot_f32_bytes(row, x),
                GgmlType::F16 => return simd::dot_f16(row, x),
                GgmlType::BF16 => return simd::dot_bf16(row, x),
                GgmlType::Q8_0 => return simd::dot_q8_0(row, x),
                GgmlType::Q4_0 => return simd::dot_q4_0(row, x, xsum),
                GgmlType::Q4_1 => return simd::dot_q4_1(row, x, xsum),
                _ => {}
            }
        }
    }
    dot_row_scalar(ty, row, x, xsum)
}

/// One stored row against up to four inputs (`k` of them valid): the quantized row is
/// expanded once per block and reused for every input (batched decode).
#[inline]
pub fn dot_row_multi(
    ty: GgmlType,
    row: &[u8],
    x: [&[f32]; 4],
    xsum: [&[f32]; 4],
    k: usize,
) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd512::available() && k > 1 {
        // SAFETY: features detected at run time; kernels check lengths.
        unsafe {
            match ty {
                GgmlType::Q4_1S => return simd512::dot_q4_1s_multi(row, x, xsum, k),
                GgmlType::Q8_0S => return simd512::dot_q8_0s_multi(row, x, k),
                _ => {}
            }
        }
    }
    let mut out = [0f32; 4];
    for i in 0..k {
        out[i] = dot_row(ty, row, x[i], xsum[i]);
    }
    out
}

pub fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    match ty {
        GgmlType::Q4_1 => {
            let mut acc = 0f32;
            for (bi, b) in row.chunks_exact(20).enumerate() {
                let xs = &x[bi * 32..bi * 32 + 32];
                let mut s = 0f32;
                for j in 0..16 {
                    s += (b[4 + j] & 0xF) as f32 * xs[j] + (b[4 + j] >> 4) as f32 * xs[j + 16];
                }
                acc += f16_at(b, 0) * s + f16_at(b, 2) * xsum[bi];
            }
            acc
        }
        GgmlType::Q4_0 => {
            let mut acc = 0f32;
            for (bi, b) in row.chunks_exact(18).enumerate() {
                let xs = &x[bi * 32..bi * 32 + 32];
                let mut s = 0f32;
                for j in 0..16 {
                    s += (b[2 + j] & 0xF) as f32 * xs[j] + (b[2 + j] >> 4) as f32 * xs[j + 16];
                }
                acc += f16_at(b, 0) * (s - 8.0 * xsum[bi]);
            }
            acc
        }
        _ => {
            let mut tmp = vec![0f32; x.len()];
            dequantize_row(ty, row, &mut tmp);
            dot_f32(&tmp, x)
        }
    }
}

/// f32 dot product.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd512::available() {
        // SAFETY: features detected at run time; lengths checked by the callers.
        return unsafe { simd512::dot_f32(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: features detected at run time; lengths checked by the callers.
        return unsafe { simd::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One f32 row against four f32 vectors.
#[inline]
pub fn dot_f32_x4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: as above.
        return unsafe { simd::dot_f32_x4(w, x) };
    }
    [
        dot_f32(w, x[0]),
        dot_f32(w, x[1]),
        dot_f32(w, x[2]),
        dot_f32(w, x[3]),
    ]
}

/// Two f32 rows against four f32 vectors: out[row][vector].
#[inline]
pub fn dot_f32_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    if simd512::available() {
        // SAFETY: as above.
        return unsafe { simd512::dot_f32_2x4(w0, w1, x) };
    }
    [dot_f32_x4(w0, x), dot_f32_x4(w1, x)]
}

/// Four rows against four inputs: `out[r][k] = w[r] · x[k]`.
pub fn dot_f32_4x4(w: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd512::available() {
        // SAFETY: as above.
        return unsafe { simd512::dot_f32_4x4(w, x) };
    }
    let a = dot_f32_2x4(w[0], w[1], x);
    let b = dot_f32_2x4(w[2], w[3], x);
    [a[0], a[1], b[0], b[1]]
}

/// y += a·x
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// AVX2 kernels.
///
/// # Safety
/// Every `unsafe fn` here needs AVX2, FMA and F16C ([`simd::available`]) and inputs of the
/// lengths its assertions check.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::missing_safety_doc)]
pub mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("SWITCHYARD_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_scalar(p: *const u8) -> f32 {
        let bits = unsafe { (p as *const u16).read_unaligned() };
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        unsafe { dot_f32_ptr(a.as_ptr(), b.as_ptr(), a.len()) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_bytes(row: &[u8], x: &[f32]) -> f32 {
        assert!(row.len() >= x.len() * 4);
        unsafe { dot_f32_ptr(row.as_ptr() as *const f32, x.as_ptr(), x.len()) }
    }

    /// `a` may be unaligned (loadu).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_f32_ptr(a: *const f32, b: *const f32, n: usize) -> f32 {
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for k in 0..4 {
                    acc[k] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(a.add(i + 8 * k)),
                        _mm256_loadu_ps(b.add(i + 8 * k)),
                        acc[k],
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = hsum(v);
            while i < n {
                s += a.add(i).read_unaligned() * *b.add(i);
                i += 1;
            }
            s
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_x4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = w.len();
        for xi in &x {
            assert!(xi.len() >= n);
        }
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 8 <= n {
                let wv = _mm256_loadu_ps(w.as_ptr().add(i));
                for k in 0..4 {
                    acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[k].as_ptr().add(i)), acc[k]);
                }
                i += 8;
            }
            let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
            while i < n {
                for k in 0..4 {
                    out[k] += w[i] * x[k][i];
                }
                i += 1;
            }
            out
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
        let full = x.len();
        assert!(row.len() >= 2 * full);
        // Rows whose length is not a multiple of 8: the tail goes scalar.
        let n = full & !7;
        let tail: f32 = (n..full)
            .map(|i| {
                half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32()
                    * x[i]
            })
            .sum();
        unsafe {
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                let w0 =
                    _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
                let w1 = _mm256_cvtph_ps(_mm_loadu_si128(
                    row.as_ptr().add(2 * i + 16) as *const __m128i
                ));
                acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i)), acc0);
                acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.as_ptr().add(i + 8)), acc1);
                i += 16;
            }
            while i < n {
                let w0 =
                    _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
                acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x.as_ptr().add(i)), acc0);
                i += 8;
            }
            hsum(_mm256_add_ps(acc0, acc1)) + tail
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        let full = x.len();
        assert!(row.len() >= 2 * full);
        let n = full & !7;
        let tail: f32 = (n..full)
            .map(|i| {
                half::bf16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32()
                    * x[i]
            })
            .sum();
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < n {
                let h = _mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i);
                let w = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(i)), acc);
                i += 8;
            }
            hsum(acc) + tail
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / 32;
        assert!(row.len() >= nb * 34 && x.len().is_multiple_of(32));
        unsafe {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let p = row.as_ptr().add(b * 34);
                let d = _mm256_set1_ps(f16_scalar(p));
                let q = p.add(2);
                let xp = x.as_ptr().add(b * 32);
                let mut s = _mm256_setzero_ps();
                for k in 0..4 {
                    let qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8 * k) as *const __m128i));
                    s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qi), _mm256_loadu_ps(xp.add(8 * k)), s);
                }
                acc = _mm256_fmadd_ps(d, s, acc);
            }
            hsum(acc)
        }
    }

    /// Σ over a block of 16 packed nibble bytes: low nibbles pair with x[0..16], high with x[16..32].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibble_block(q: *const u8, xp: *const f32) -> __m256 {
        unsafe {
            let qs = _mm_loadu_si128(q as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
            let l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let l1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)));
            let h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let h1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)));
            let s = _mm256_mul_ps(l0, _mm256_loadu_ps(xp));
            let s = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xp.add(8)), s);
            let s = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xp.add(16)), s);
            _mm256_fmadd_ps(h1, _mm256_loadu_ps(xp.add(24)), s)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let nb = x.len() / 32;
        assert!(row.len() >= nb * 20 && xsum.len() >= nb && x.len().is_multiple_of(32));
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut macc = 0f32;
            for b in 0..nb {
                let p = row.as_ptr().add(b * 20);
                let s = nibble_block(p.add(4), x.as_ptr().add(b * 32));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_scalar(p)), s, acc);
                macc += f16_scalar(p.add(2)) * *xsum.get_unchecked(b);
            }
            hsum(acc) + macc
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let nb = x.len() / 32;
        assert!(row.len() >= nb * 18 && xsum.len() >= nb && x.len().is_multiple_of(32));
        unsafe {
            let mut acc = _mm256_setzero_ps();
            let mut macc = 0f32;
            for b in 0..nb {
                let p = row.as_ptr().add(b * 18);
                let s = nibble_block(p.add(2), x.as_ptr().add(b * 32));
                let d = f16_scalar(p);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
                macc -= 8.0 * d * *xsum.get_unchecked(b);
            }
            hsum(acc) + macc
        }
    }
}

/// AVX-512 versions of the hottest kernels (16 lanes: one 32-element block in two FMAs).
///
/// # Safety
/// Every `unsafe fn` here needs AVX-512F/BW/VL, FMA and F16C ([`simd512::available`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::missing_safety_doc)]
pub mod simd512 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("SWITCHYARD_NO_SIMD").is_none()
                && std::env::var_os("SWITCHYARD_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        unsafe { dot_ptr(a.as_ptr(), b.as_ptr(), n) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_f32_bytes(row: &[u8], x: &[f32]) -> f32 {
        assert!(row.len() >= x.len() * 4);
        unsafe { dot_ptr(row.as_ptr() as *const f32, x.as_ptr(), x.len()) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    unsafe fn dot_ptr(a: *const f32, b: *const f32, n: usize) -> f32 {
        unsafe {
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut i = 0;
            while i + 32 <= n {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc0);
                acc1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.add(i + 16)),
                    _mm512_loadu_ps(b.add(i + 16)),
                    acc1,
                );
                i += 32;
            }
            if i + 16 <= n {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), acc0);
                i += 16;
            }
            if i < n {
                let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
                acc1 = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(m, a.add(i)),
                    _mm512_maskz_loadu_ps(m, b.add(i)),
                    acc1,
                );
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_f32_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = w0.len();
        assert!(w1.len() >= n && x.iter().all(|v| v.len() >= n));
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; 2];
            let mut i = 0;
            let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as u16;
            while i < n {
                let m = if i + 16 <= n { 0xFFFF } else { tail };
                let r0 = _mm512_maskz_loadu_ps(m, w0.as_ptr().add(i));
                let r1 = _mm512_maskz_loadu_ps(m, w1.as_ptr().add(i));
                for k in 0..4 {
                    let xv = _mm512_maskz_loadu_ps(m, x[k].as_ptr().add(i));
                    a[0][k] = _mm512_fmadd_ps(r0, xv, a[0][k]);
                    a[1][k] = _mm512_fmadd_ps(r1, xv, a[1][k]);
                }
                i += 16;
            }
            let mut out = [[0f32; 4]; 2];
            for r in 0..2 {
                for k in 0..4 {
                    out[r][k] = _mm512_reduce_add_ps(a[r][k]);
                }
            }
            out
        }
    }

    /// Four f32 rows against four inputs: 16 dot products, 8 loads per 16 FMAs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_f32_4x4(w: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = w[0].len();
        assert!(w.iter().all(|v| v.len() >= n) && x.iter().all(|v| v.len() >= n));
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; 4];
            let mut i = 0;
            let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as u16;
            while i < n {
                let m = if i + 16 <= n { 0xFFFF } else { tail };
                let xv = [
                    _mm512_maskz_loadu_ps(m, x[0].as_ptr().add(i)),
                    _mm512_maskz_loadu_ps(m, x[1].as_ptr().add(i)),
                    _mm512_maskz_loadu_ps(m, x[2].as_ptr().add(i)),
                    _mm512_maskz_loadu_ps(m, x[3].as_ptr().add(i)),
                ];
                for r in 0..4 {
                    let wv = _mm512_maskz_loadu_ps(m, w[r].as_ptr().add(i));
                    for k in 0..4 {
                        a[r][k] = _mm512_fmadd_ps(wv, xv[k], a[r][k]);
                    }
                }
                i += 16;
            }
            let mut out = [[0f32; 4]; 4];
            for r in 0..4 {
                for k in 0..4 {
                    out[r][k] = _mm512_reduce_add_ps(a[r][k]);
                }
            }
            out
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_q4_1s(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
        let nb = x.len() / 32;
        assert!(row.len() >= nb * 20 && xsum.len() >= nb && x.len().is_multiple_of(32));
        unsafe {
            let dp = row.as_ptr();
            let mp = row.as_ptr().add(2 * nb);
            let qp = row.as_ptr().add(4 * nb);
            let low = _mm512_set1_epi32(0xF);
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut macc = _mm512_setzero_ps();
            let mut ds = [0f32; 16];
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                let d16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16));
                let m16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mp.add(2 * b0) as *const i16));
                macc = _mm512_fmadd_ps(
                    m16,
                    _mm512_maskz_loadu_ps(mask, xsum.as_ptr().add(b0)),
                    macc,
                );
                _mm512_storeu_ps(ds.as_mut_ptr(), d16);
                for j in 0..cnt {
                    let b = b0 + j;
                    let xp = x.as_ptr().add(32 * b);
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * b) as *const __m128i));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                    let s = _mm512_mul_ps(lo, _mm512_loadu_ps(xp));
                    let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), s);
                    acc[j & 1] = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, acc[j & 1]);
                }
                b0 += cnt;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + _mm512_reduce_add_ps(macc)
        }
    }

    /// A split Q4_1 row to f32 (the tile path of batched matmuls).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dequant_q4_1s(row: &[u8], out: &mut [f32]) {
        let nb = out.len() / 32;
        assert!(row.len() >= nb * 20 && out.len().is_multiple_of(32));
        unsafe {
            let dp = row.as_ptr();
            let mp = row.as_ptr().add(2 * nb);
            let qp = row.as_ptr().add(4 * nb);
            let op = out.as_mut_ptr();
            let low = _mm512_set1_epi32(0xF);
            let (mut ds, mut ms) = ([0f32; 16], [0f32; 16]);
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                let d16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16));
                let m16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mp.add(2 * b0) as *const i16));
                _mm512_storeu_ps(ds.as_mut_ptr(), d16);
                _mm512_storeu_ps(ms.as_mut_ptr(), m16);
                for j in 0..cnt {
                    let b = b0 + j;
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * b) as *const __m128i));
                    let d = _mm512_set1_ps(ds[j]);
                    let m = _mm512_set1_ps(ms[j]);
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                    _mm512_storeu_ps(op.add(32 * b), _mm512_add_ps(_mm512_mul_ps(d, lo), m));
                    _mm512_storeu_ps(op.add(32 * b + 16), _mm512_add_ps(_mm512_mul_ps(d, hi), m));
                }
                b0 += cnt;
            }
        }
    }

    /// A split Q8_0 row to f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dequant_q8_0s(row: &[u8], out: &mut [f32]) {
        let nb = out.len() / 32;
        assert!(row.len() >= nb * 34 && out.len().is_multiple_of(32));
        unsafe {
            let dp = row.as_ptr();
            let qp = row.as_ptr().add(2 * nb);
            let op = out.as_mut_ptr();
            let mut ds = [0f32; 16];
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                let d16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16));
                _mm512_storeu_ps(ds.as_mut_ptr(), d16);
                for j in 0..cnt {
                    let b = b0 + j;
                    let q = qp.add(32 * b);
                    let d = _mm512_set1_ps(ds[j]);
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        q as *const __m128i,
                    )));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        q.add(16) as *const __m128i
                    )));
                    _mm512_storeu_ps(op.add(32 * b), _mm512_mul_ps(d, q0));
                    _mm512_storeu_ps(op.add(32 * b + 16), _mm512_mul_ps(d, q1));
                }
                b0 += cnt;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_q4_1s_multi(
        row: &[u8],
        x: [&[f32]; 4],
        xsum: [&[f32]; 4],
        k: usize,
    ) -> [f32; 4] {
        let nb = x[0].len() / 32;
        assert!(row.len() >= nb * 20 && (1..=4).contains(&k));
        for t in 0..k {
            assert!(x[t].len() >= nb * 32 && xsum[t].len() >= nb);
        }
        unsafe {
            let dp = row.as_ptr();
            let mp = row.as_ptr().add(2 * nb);
            let qp = row.as_ptr().add(4 * nb);
            let low = _mm512_set1_epi32(0xF);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut macc = [_mm512_setzero_ps(); 4];
            let mut ds = [0f32; 16];
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                let d16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16));
                let m16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mp.add(2 * b0) as *const i16));
                for t in 0..k {
                    macc[t] = _mm512_fmadd_ps(
                        m16,
                        _mm512_maskz_loadu_ps(mask, xsum[t].as_ptr().add(b0)),
                        macc[t],
                    );
                }
                _mm512_storeu_ps(ds.as_mut_ptr(), d16);
                for j in 0..cnt {
                    let b = b0 + j;
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16 * b) as *const __m128i));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                    let d = _mm512_set1_ps(ds[j]);
                    for t in 0..k {
                        let xp = x[t].as_ptr().add(32 * b);
                        let s = _mm512_mul_ps(lo, _mm512_loadu_ps(xp));
                        let s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), s);
                        acc[t] = _mm512_fmadd_ps(d, s, acc[t]);
                    }
                }
                b0 += cnt;
            }
            let mut out = [0f32; 4];
            for t in 0..k {
                out[t] = _mm512_reduce_add_ps(acc[t]) + _mm512_reduce_add_ps(macc[t]);
            }
            out
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_q8_0s_multi(row: &[u8], x: [&[f32]; 4], k: usize) -> [f32; 4] {
        let nb = x[0].len() / 32;
        assert!(row.len() >= nb * 34 && (1..=4).contains(&k));
        for t in 0..k {
            assert!(x[t].len() >= nb * 32);
        }
        unsafe {
            let dp = row.as_ptr();
            let qp = row.as_ptr().add(2 * nb);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut ds = [0f32; 16];
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                _mm512_storeu_ps(
                    ds.as_mut_ptr(),
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16)),
                );
                for j in 0..cnt {
                    let b = b0 + j;
                    let q = qp.add(32 * b);
                    let d = _mm512_set1_ps(ds[j]);
                    let q0 = _mm512_mul_ps(
                        d,
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            q as *const __m128i,
                        ))),
                    );
                    let q1 = _mm512_mul_ps(
                        d,
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            q.add(16) as *const __m128i
                        ))),
                    );
                    for t in 0..k {
                        let xp = x[t].as_ptr().add(32 * b);
                        acc[t] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(xp), acc[t]);
                        acc[t] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xp.add(16)), acc[t]);
                    }
                }
                b0 += cnt;
            }
            let mut out = [0f32; 4];
            for t in 0..k {
                out[t] = _mm512_reduce_add_ps(acc[t]);
            }
            out
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn dot_q8_0s(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / 32;
        assert!(row.len() >= nb * 34 && x.len().is_multiple_of(32));
        unsafe {
            let dp = row.as_ptr();
            let qp = row.as_ptr().add(2 * nb);
            let mut acc = [_mm512_setzero_ps(); 2];
            let mut ds = [0f32; 16];
            let mut b0 = 0;
            while b0 < nb {
                let cnt = (nb - b0).min(16);
                let mask: __mmask16 = ((1u32 << cnt) - 1) as u16;
                let d16 =
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, dp.add(2 * b0) as *const i16));
                _mm512_storeu_ps(ds.as_mut_ptr(), d16);
                for j in 0..cnt {
                    let b = b0 + j;
                    let xp = x.as_ptr().add(32 * b);
                    let q = qp.add(32 * b);
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        q as *const __m128i,
                    )));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        q.add(16) as *const __m128i
                    )));
                    let s = _mm512_mul_ps(q0, _mm512_loadu_ps(xp));
                    let s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xp.add(16)), s);
                    acc[j & 1] = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, acc[j & 1]);
                }
                b0 += cnt;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Random blocks with sane f16 scales (random bytes may be NaN/Inf).
    fn rand_row(ty: GgmlType, cols: usize) -> Vec<u8> {
        let mut r = rand_bytes(ty.row_bytes(cols), 7);
        let bb = ty.block_bytes();
        let scale_offsets: &[usize] = match ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q4K => &[0, 2],
            GgmlType::Q6K => &[208],
            GgmlType::F16 => &[],
            _ => &[],
        };
        for b in r.chunks_exact_mut(bb) {
            for &o in scale_offsets {
                b[o..o + 2].copy_from_slice(
                    &f16::from_f32(0.0123 + o as f32 * 0.001)
                        .to_bits()
                        .to_le_bytes(),
                );
            }
        }
        if ty == GgmlType::BF16 {
            for c in r.chunks_exact_mut(2) {
                let v = bf16::from_f32((c[0] as f32 - 128.0) / 64.0);
                c.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        if ty == GgmlType::F16 {
            for c in r.chunks_exact_mut(2) {
                c.copy_from_slice(
                    &f16::from_f32((c[0] as f32 - 128.0) / 64.0)
                        .to_bits()
                        .to_le_bytes(),
                );
            }
        }
        r
    }

    #[test]
    fn fused_dots_match_dequantized() {
        // Half-precision rows of any length (e.g. 172 = stories260K's FFN width), quantized
        // rows in whole blocks.
        let cases = [
            (GgmlType::F16, 256),
            (GgmlType::F16, 172),
            (GgmlType::F16, 7),
            (GgmlType::BF16, 256),
            (GgmlType::BF16, 172),
            (GgmlType::BF16, 13),
            (GgmlType::Q8_0, 256),
            (GgmlType::Q4_0, 256),
            (GgmlType::Q4_1, 256),
        ];
        for (ty, cols) in cases {
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut xs = Vec::new();
            block_sums(&x, &mut xs);
            let row = rand_row(ty, cols);
            let mut w = vec![0f32; cols];
            dequantize_row(ty, &row, &mut w);
            let want: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            for got in [
                dot_row(ty, &row, &x, &xs),
                dot_row_scalar(ty, &row, &x, &xs),
            ] {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{ty:?} x {cols}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn multi_row_kernels_match() {
        for n in [8, 40, 64, 576] {
            let v = |s: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * s + 3) % 17) as f32 / 7.0 - 1.0)
                    .collect()
            };
            let (w0, w1) = (v(3), v(5));
            let xs = [v(7), v(11), v(13), v(2)];
            let x = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let got = dot_f32_2x4(&w0, &w1, x);
            let one = dot_f32_x4(&w0, x);
            for k in 0..4 {
                let want0: f32 = w0.iter().zip(x[k]).map(|(a, b)| a * b).sum();
                let want1: f32 = w1.iter().zip(x[k]).map(|(a, b)| a * b).sum();
                assert!(
                    (got[0][k] - want0).abs() < 1e-3
                        && (got[1][k] - want1).abs() < 1e-3
                        && (one[k] - want0).abs() < 1e-3
                );
                assert!((dot_f32(&w0, x[k]) - want0).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn split_layouts_match() {
        let cols = 576;
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut xs = Vec::new();
        block_sums(&x, &mut xs);
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let row = rand_row(ty, cols);
            let st = split_type(ty).unwrap();
            let mut sp = Vec::new();
            split_row(ty, &row, &mut sp);
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            dequantize_row(ty, &row, &mut a);
            dequantize_row(st, &sp, &mut b);
            assert_eq!(a, b);
            let want = dot_row_scalar(ty, &row, &x, &xs);
            let got = dot_row(st, &sp, &x, &xs);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{ty:?}: {got} vs {want}"
            );
        }
    }

    /// K-quant dequantization against gguf-py's reference implementation
    /// (testdata/kquants.json: random blocks and the values gguf-py decodes them to).
    #[test]
    fn k_quants_match_gguf_py() {
        let j: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/kquants.json")).unwrap();
        for case in j["cases"].as_array().unwrap() {
            let ty = match case["type"].as_str().unwrap() {
                "Q4_K" => GgmlType::Q4K,
                _ => GgmlType::Q6K,
            };
            let hex = case["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let mut got = vec![0f32; want.len()];
            dequantize_row(ty, &bytes, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{ty:?}[{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn q4_1_dequant_by_hand() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4] = 0x3A; // element 0 = 0xA, element 16 = 0x3
        let mut o = vec![0f32; 32];
        dequantize_row(GgmlType::Q4_1, &b, &mut o);
        assert_eq!(o[0], 0.5 * 10.0 - 1.0);
        assert_eq!(o[16], 0.5 * 3.0 - 1.0);
        assert_eq!(o[1], -1.0);
    }
}
