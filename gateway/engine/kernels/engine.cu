// Switchyard's CUDA kernels for the engine's forward pass.
//
// Compiled at start by NVRTC for the device's architecture (no CUDA toolkit at build time),
// so no headers are included: bf16 is handled as raw 16-bit patterns.
//
// Layout conventions (all row-major):
//   activations  f32  [n, width]           one row per token of the batch
//   weights      bf16 [out, in]            a projection's rows are its outputs
//   KV cache     bf16 [ctx, kv_heads, hd]  per slot and layer, contiguous (vAttention layout);
//                                          `kvp` holds (K base, V base) per batch item
typedef unsigned short bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf(bf16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float bf_lo(u32 u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(u32 u) { return __uint_as_float(u & 0xffff0000u); }

// Round to nearest even, NaN kept a NaN.
__device__ __forceinline__ bf16 to_bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Round two floats to a bf16 pair in one instruction (lo in the low half).
__device__ __forceinline__ u32 cvt_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Programmatic dependent launch (sm_90+; the host launches with PDL when it can, see
// `Gpu::launch_smem`): a kernel lets the next one in the stream be scheduled as soon as all
// its blocks have started (`pdl_trigger`), and waits for the previous one to complete and
// flush (`pdl_wait`) before it touches anything the previous kernels write or read. Work
// that reads only constant data (weights) may run before the wait, overlapping the previous
// kernel's tail. Without PDL (older GPUs, or a plain launch) both are no-ops.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Every kernel that does not preload constant data starts with this.
#define PDL_ENTRY \
    pdl_trigger(); \
    pdl_wait()

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float sh[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? sh[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

// Exclusive prefix sum over the block (1024 threads at most) of one value per thread, in
// thread order; *total gets the block's sum.
template <typename T>
__device__ T block_excl_scan(T v, T* total) {
    __shared__ T ws[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    T x = v;
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) ws[w] = x;
    __syncthreads();
    if (w == 0) {
        T t = lane < nw ? ws[lane] : (T)0;
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        ws[lane] = t;
    }
    __syncthreads();
    T base = w > 0 ? ws[w - 1] : (T)0;
    *total = ws[nw - 1];
    __syncthreads();
    return base + x - v;
}

// x[r] = E[tok[r]]; grid n.
extern "C" __global__ void embed(const bf16* E, const u32* tok, float* x, int dim) {
    PDL_ENTRY;
    int r = blockIdx.x;
    const bf16* e = E + (size_t)tok[r] * dim;
    float* xr = x + (size_t)r * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xr[i] = bf(e[i]);
}

// out[r] = src[idx[r]]; grid n_sel.
extern "C" __global__ void gather_rows(const float* src, const int* idx, float* out, int dim) {
    PDL_ENTRY;
    int r = blockIdx.x;
    const float* s = src + (size_t)idx[r] * dim;
    float* o = out + (size_t)r * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = s[i];
}

// out[r] = x[r] / rms(x[r]) * w; grid n, block up to 1024 (one block per row; float4
// loads when dim % 4 == 0, so a 4096-wide row is one load per thread). `rmsnorm16` writes
// the result rounded to bf16 (the input of a cuBLAS product, with no conversion pass).
__device__ __forceinline__ void store4(float* o, int i, float a, float b, float c, float d) {
    ((float4*)o)[i] = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(bf16* o, int i, float a, float b, float c, float d) {
    ((uint2*)o)[i] = make_uint2(cvt_bf2(a, b), cvt_bf2(c, d));
}
__device__ __forceinline__ void store1(float* o, int i, float a) { o[i] = a; }
__device__ __forceinline__ void store1(bf16* o, int i, float a) { o[i] = to_bf(a); }
template <typename T>
__device__ __forceinline__ void rmsnorm_impl(const float* __restrict__ x,
                                             const float* __restrict__ w, T* __restrict__ out,
                                             int dim, float eps) {
    int r = blockIdx.x;
    const float* xr = x + (size_t)r * dim;
    T* o = out + (size_t)r * dim;
    float ss = 0.f;
    if ((dim & 3) == 0) {
        const float4* x4 = (const float4*)xr;
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        ss = block_sum(ss);
        float inv = rsqrtf(ss / (float)dim + eps);
        const float4* w4 = (const float4*)w;
        for (int i = threadIdx.x; i < dim / 4; i += blockDim.x) {
            float4 v = x4[i], g = w4[i];
            store4(o, i, v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
        ss = block_sum(ss);
        float inv = rsqrtf(ss / (float)dim + eps);
        for (int i = threadIdx.x; i < dim; i += blockDim.x) store1(o, i, xr[i] * inv * w[i]);
    }
}
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                   float* __restrict__ out, int dim, float eps) {
    PDL_ENTRY;
    rmsnorm_impl(x, w, out, dim, eps);
}
extern "C" __global__ void rmsnorm16(const float* __restrict__ x, const float* __restrict__ w,
                                     bf16* __restrict__ out, int dim, float eps) {
    PDL_ENTRY;
    rmsnorm_impl(x, w, out, dim, eps);
}

#ifndef ATT_WARPS
#define ATT_WARPS 8
#endif
#if ATT_WARPS < 1 || ATT_WARPS > 32
#error "ATT_WARPS: 1 to 32 (the host launches 32 * ATT_WARPS threads)"
#endif
// ATT_MIN_BLOCKS (a tuning macro, unset by default): blocks per SM the decode attention
// kernels are compiled to fit, so the registers a thread may use follow. Unset, the kernels
// carry no launch bounds (attention4_h: 56 registers, 4 blocks of 256 threads per SM); even
// `__launch_bounds__(256, 1)` gave it 72 (3 blocks). The host takes the block size as
// 32 * ATT_WARPS from the same defines.
#ifdef ATT_MIN_BLOCKS
#define ATT_BOUNDS __launch_bounds__(32 * ATT_WARPS, ATT_MIN_BLOCKS)
#else
#define ATT_BOUNDS
#endif
#define ATT_MIN_SPLIT 16

__device__ __forceinline__ void bf4(uint2 u, float* f) {
    f[0] = bf_lo(u.x);
    f[1] = bf_hi(u.x);
    f[2] = bf_lo(u.y);
    f[3] = bf_hi(u.y);
}

// Causal attention of row r = rows[blockIdx.x]'s query head h over positions 0..pos[r] of
// its item's cache (decode rows and short chunks; long prefill chunks go to
// attention_tiles). grid (rows, n_heads, splits) or, with heads_x, (n_heads, rows, splits);
// block 32 * ATT_WARPS; head_dim a multiple of 4, at most 256. Each lane
// owns 4 consecutive dimensions (8-byte loads) of up to two 128-wide halves; each warp walks
// every ATT_WARPS-th position, ATT_U positions per iteration (2 in `attention`, 4 in
// `attention4`) with their K and V loads issued together, with an online softmax; the
// warps' partial results are merged at the end. The output goes to `out` (f32), or rounded
// to bf16 to `out16` when that is not null (the input of a cuBLAS o product).
// K and V of positions t0, t0 + GW, .. (ATT_U of them; zeros past T) for this lane's
// dimensions of C 128-wide halves.
template <int ATT_U, int C>
__device__ __forceinline__ void att_load(uint2 (&kk)[ATT_U][C], uint2 (&vv)[ATT_U][C],
                                         const bf16* K, const bf16* V, int kvd, int lane,
                                         const bool (&ok)[C], int t0, int GW, int T) {
#pragma unroll
    for (int u = 0; u < ATT_U; u++) {
        size_t t = (size_t)(t0 + u * GW);
        bool have = t0 + u * GW < T;
#pragma unroll
        for (int c = 0; c < C; c++) {
            if (have && ok[c]) {
                kk[u][c] = *(const uint2*)(K + t * kvd + 4 * lane + 128 * c);
                vv[u][c] = *(const uint2*)(V + t * kvd + 4 * lane + 128 * c);
            } else {
                kk[u][c] = make_uint2(0u, 0u);
                vv[u][c] = make_uint2(0u, 0u);
            }
        }
    }
}

// The end of decode attention, shared by its kernels: the block's NV partial results
// (max, sum, unnormalized output in s_acc, STRIDE floats apart; a part with no positions has
// sum 0) merged into the (row, head)'s output, or with splits into `part`, the last split
// to finish merging them in order. After a __syncthreads that published s_m, s_l, s_acc.
template <int NV, int STRIDE>
__device__ __forceinline__ void att_merge(const float* s_m, const float* s_l, const float* s_acc,
                                          u32& s_ticket, int S, int r, int ri, int h, int nh,
                                          int hd, float* out, bf16* out16, float* part,
                                          u32* cnt) {
    float M = NEG_INF;
    for (int i = 0; i < NV; i++) M = fmaxf(M, s_m[i]);
    float L = 0.f;
    for (int i = 0; i < NV; i++)
        if (s_l[i] > 0.f) L += s_l[i] * __expf(s_m[i] - M);
    // One split (gridDim.z == 1): the output; else (max, sum, unnormalized output) into
    // part, and the last block of the (row, head) to finish (a ticket in cnt, zero between
    // calls) merges the splits in order.
    size_t oi = ((size_t)r * nh + h) * hd;
    size_t slot = (size_t)ri * nh + h;
    float* pp = part + (slot * gridDim.z + blockIdx.z) * (hd + 2);
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float a = 0.f;
        for (int i = 0; i < NV; i++)
            if (s_l[i] > 0.f) a += s_acc[i * STRIDE + e] * __expf(s_m[i] - M);
        if (S == 1)
            out16 ? store1(out16 + oi, e, a / L) : store1(out + oi, e, a / L);
        else
            pp[2 + e] = a;
    }
    if (S == 1) return;
    if (threadIdx.x == 0) {
        pp[0] = M;
        pp[1] = L;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_ticket = atomicAdd(&cnt[slot], 1u);
    __syncthreads();
    if (s_ticket != (u32)S - 1) return;
    __threadfence();
    const float* base = part + slot * gridDim.z * (hd + 2);
    float MM = NEG_INF, LL = 0.f;
    for (int i = 0; i < S; i++)
        if (__ldcg(base + i * (hd + 2) + 1) > 0.f) MM = fmaxf(MM, __ldcg(base + i * (hd + 2)));
    for (int i = 0; i < S; i++) {
        float li = __ldcg(base + i * (hd + 2) + 1);
        if (li > 0.f) LL += li * __expf(__ldcg(base + i * (hd + 2)) - MM);
    }
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float a = 0.f;
        for (int i = 0; i < S; i++) {
            const float* pi = base + i * (hd + 2);
            if (__ldcg(pi + 1) > 0.f) a += __ldcg(pi + 2 + e) * __expf(__ldcg(pi) - MM);
        }
        out16 ? store1(out16 + oi, e, a / LL) : store1(out + oi, e, a / LL);
    }
    if (threadIdx.x == 0) cnt[slot] = 0u;
}

// C: 128-wide halves of the head a lane covers (1: head_dim <= 128, 2: up to 256). PF: the
// next iteration's K/V loads go out before this iteration's arithmetic.
template <int ATT_U, int C, bool PF>
__device__ void attention_impl(const float* q, const u64* kvp, const int* item, const int* pos,
                               const int* rows, float* out, bf16* out16, int nh, int nkv,
                               int hd, float scale, float* part, u32* cnt, int heads_x) {
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS * 256];
    __shared__ u32 s_ticket;
    // grid (rows, heads, splits), or (heads, rows, splits) with heads_x.
    int ri = heads_x ? blockIdx.y : blockIdx.x, h = heads_x ? blockIdx.x : blockIdx.y;
    int r = rows[ri];
    int it = item[r], T = pos[r] + 1;
    // Splits in use: at least ATT_MIN_SPLIT positions each (short contexts skip the merge);
    // the grid's other blocks leave at once. Every block of a (row, head) agrees on S.
    int S = min((int)gridDim.z, max(1, (T + ATT_MIN_SPLIT - 1) / ATT_MIN_SPLIT));
    if ((int)blockIdx.z >= S) return;
    int gw = blockIdx.z * ATT_WARPS + (threadIdx.x >> 5), GW = S * ATT_WARPS;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvd = nkv * hd, kh = h / (nh / nkv);
    const bf16* K = (const bf16*)kvp[2 * it] + kh * hd;
    const bf16* V = (const bf16*)kvp[2 * it + 1] + kh * hd;
    const float* qr = q + ((size_t)r * nh + h) * hd;
    bool ok[C];
    float qv[C][4], acc[C][4];
#pragma unroll
    for (int c = 0; c < C; c++) {
        int e = 4 * lane + 128 * c;
        ok[c] = e < hd;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            qv[c][i] = ok[c] ? qr[e + i] * scale : 0.f;
            acc[c][i] = 0.f;
        }
    }
    float m = NEG_INF, l = 0.f;
    // ATT_U positions per iteration: their K and V loads go out together, their scores are
    // reduced together (independent shuffles) and folded into the softmax in one update.
    uint2 kk[ATT_U][C], vv[ATT_U][C];
    if (PF) att_load<ATT_U, C>(kk, vv, K, V, kvd, lane, ok, gw, GW, T);
    for (int t0 = gw; t0 < T; t0 += ATT_U * GW) {
        uint2 nk[ATT_U][C], nv[ATT_U][C];
        if (PF)
            att_load<ATT_U, C>(nk, nv, K, V, kvd, lane, ok, t0 + ATT_U * GW, GW, T);
        else
            att_load<ATT_U, C>(kk, vv, K, V, kvd, lane, ok, t0, GW, T);
        bool have[ATT_U];
#pragma unroll
        for (int u = 0; u < ATT_U; u++) have[u] = t0 + u * GW < T;
        float sc[ATT_U];
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            float s = 0.f, kf[4];
#pragma unroll
            for (int c = 0; c < C; c++) {
                bf4(kk[u][c], kf);
#pragma unroll
                for (int i = 0; i < 4; i++) s = fmaf(qv[c][i], kf[i], s);
            }
            sc[u] = s;
        }
#pragma unroll
        for (int u = 0; u < ATT_U; u++) sc[u] = warp_sum(sc[u]);
        float mn = m;
#pragma unroll
        for (int u = 0; u < ATT_U; u++)
            if (have[u]) mn = fmaxf(mn, sc[u]);
        float corr = __expf(m - mn);
        l *= corr;
#pragma unroll
        for (int c = 0; c < C; c++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[c][i] *= corr;
#pragma unroll
        for (int u = 0; u < ATT_U; u++) {
            if (!have[u]) break;
            float pe = __expf(sc[u] - mn);
            l += pe;
#pragma unroll
            for (int c = 0; c < C; c++) {
                float vf[4];
                bf4(vv[u][c], vf);
#pragma unroll
                for (int i = 0; i < 4; i++) acc[c][i] = fmaf(pe, vf[i], acc[c][i]);
            }
        }
        m = mn;
        if (PF) {
#pragma unroll
            for (int u = 0; u < ATT_U; u++)
#pragma unroll
                for (int c = 0; c < C; c++) {
                    kk[u][c] = nk[u][c];
                    vv[u][c] = nv[u][c];
                }
        }
    }
    if (lane == 0) {
        s_m[w] = m;
        s_l[w] = l;
    }
#pragma unroll
    for (int c = 0; c < C; c++)
        if (ok[c])
#pragma unroll
            for (int i = 0; i < 4; i++) s_acc[w * 256 + 4 * lane + 128 * c + i] = acc[c][i];
    __syncthreads();
    att_merge<ATT_WARPS, 256>(s_m, s_l, s_acc, s_ticket, S, r, ri, h, nh, hd, out, out16, part, cnt);
}

#define ATT_ARGS                                                                              \
    const float *q, const u64 *kvp, const int *item, const int *pos, const int *rows,         \
        float *out, bf16 *out16, int nh, int nkv, int hd, float scale, float *part, u32 *cnt, \
        int heads_x
#define ATT_PASS q, kvp, item, pos, rows, out, out16, nh, nkv, hd, scale, part, cnt, heads_x
// Prefetching the next positions' K/V in the head_dim <= 128 variants (ATT_PF, on by
// default): 0 turns it off for side-by-side runs.
#ifndef ATT_PF
#define ATT_PF 1
#endif
// (name, positions per warp iteration, 128-wide halves per lane, prefetch)
#define ATT_KERNEL(NAME, U, C, PF)                                                            \
    extern "C" __global__ void ATT_BOUNDS NAME(ATT_ARGS) {                                       \
        PDL_ENTRY;                                                                            \
        attention_impl<U, C, PF>(ATT_PASS);                                                   \
    }
ATT_KERNEL(attention, 2, 2, false)
ATT_KERNEL(attention4, 4, 2, false)
ATT_KERNEL(attention_h, 2, 1, ATT_PF)
ATT_KERNEL(attention4_h, 4, 1, ATT_PF)

// Decode attention for heads up to 128 wide (head_dim a multiple of 8) with half a warp per
// position: each lane owns 8 consecutive dimensions (16-byte K and V loads), so a warp takes
// two positions per slot and a score needs 4 shuffles, not 5. Otherwise as attention_impl
// (grid, splits, online softmax, merge); the half-warps' partial results merge like warps'.
// ATT_HW_U positions per half-warp per iteration, the next iteration's loads issued first.
#ifndef ATT_HW_U
#define ATT_HW_U 2
#endif
__device__ __forceinline__ void bf8(uint4 u, float* f) {
    f[0] = bf_lo(u.x);
    f[1] = bf_hi(u.x);
    f[2] = bf_lo(u.y);
    f[3] = bf_hi(u.y);
    f[4] = bf_lo(u.z);
    f[5] = bf_hi(u.z);
    f[6] = bf_lo(u.w);
    f[7] = bf_hi(u.w);
}
__device__ __forceinline__ float half_sum(float v) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <int U>
__device__ __forceinline__ void att_load_hw(uint4 (&kk)[U], uint4 (&vv)[U], const bf16* K,
                                            const bf16* V, int kvd, int e, bool ok, int t0,
                                            int GW, int T) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        size_t t = (size_t)(t0 + u * GW);
        if (ok && t0 + u * GW < T) {
            kk[u] = *(const uint4*)(K + t * kvd + e);
            vv[u] = *(const uint4*)(V + t * kvd + e);
        } else {
            kk[u] = make_uint4(0u, 0u, 0u, 0u);
            vv[u] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}
__device__ void attention_hw_impl(const float* q, const u64* kvp, const int* item, const int* pos,
                                  const int* rows, float* out, bf16* out16, int nh, int nkv,
                                  int hd, float scale, float* part, u32* cnt, int heads_x) {
    constexpr int U = ATT_HW_U, NV = 2 * ATT_WARPS;
    __shared__ float s_m[NV], s_l[NV];
    __shared__ float s_acc[NV * 128];
    __shared__ u32 s_ticket;
    int ri = heads_x ? blockIdx.y : blockIdx.x, h = heads_x ? blockIdx.x : blockIdx.y;
    int r = rows[ri];
    int it = item[r], T = pos[r] + 1;
    int S = min((int)gridDim.z, max(1, (T + ATT_MIN_SPLIT - 1) / ATT_MIN_SPLIT));
    if ((int)blockIdx.z >= S) return;
    int lane = threadIdx.x & 31, sl = lane & 15;
    int vw = threadIdx.x >> 4;  // this half-warp within the block
    int gw = blockIdx.z * NV + vw, GW = S * NV;
    int kvd = nkv * hd, kh = h / (nh / nkv);
    const bf16* K = (const bf16*)kvp[2 * it] + kh * hd;
    const bf16* V = (const bf16*)kvp[2 * it + 1] + kh * hd;
    const float* qr = q + ((size_t)r * nh + h) * hd;
    int e = 8 * sl;
    bool ok = e < hd;
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        qv[i] = ok ? qr[e + i] * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    uint4 kk[U], vv[U];
    att_load_hw<U>(kk, vv, K, V, kvd, e, ok, gw, GW, T);
    // Both halves of a warp run the loop the same number of times (their trip counts can
    // differ by one: the shuffles need every lane), the extra trip with nothing to add.
    int tw = gw & ~1;
    for (int t0 = gw, tb = tw; tb < T; t0 += U * GW, tb += U * GW) {
        uint4 nk[U], nv[U];
        att_load_hw<U>(nk, nv, K, V, kvd, e, ok, t0 + U * GW, GW, T);
        bool have[U];
#pragma unroll
        for (int u = 0; u < U; u++) have[u] = t0 + u * GW < T;
        float sc[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8], sacc = 0.f;
            bf8(kk[u], kf);
#pragma unroll
            for (int i = 0; i < 8; i++) sacc = fmaf(qv[i], kf[i], sacc);
            sc[u] = sacc;
        }
#pragma unroll
        for (int u = 0; u < U; u++) sc[u] = half_sum(sc[u]);
        float mn = m;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (have[u]) mn = fmaxf(mn, sc[u]);
        float corr = mn == NEG_INF ? 1.f : __expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (!have[u]) break;
            float pe = __expf(sc[u] - mn), vf[8];
            l += pe;
            bf8(vv[u], vf);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] = fmaf(pe, vf[i], acc[i]);
        }
        m = mn;
#pragma unroll
        for (int u = 0; u < U; u++) {
            kk[u] = nk[u];
            vv[u] = nv[u];
        }
    }
    if (sl == 0) {
        s_m[vw] = m;
        s_l[vw] = l;
    }
    if (ok)
#pragma unroll
        for (int i = 0; i < 8; i++) s_acc[vw * 128 + e + i] = acc[i];
    __syncthreads();
    att_merge<NV, 128>(s_m, s_l, s_acc, s_ticket, S, r, ri, h, nh, hd, out, out16, part, cnt);
}
extern "C" __global__ void ATT_BOUNDS attention_hw(ATT_ARGS) {
    PDL_ENTRY;
    attention_hw_impl(ATT_PASS);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- Prefill attention over query tiles ----
//
// Causal attention for a tile of up to FA_Q consecutive rows of one item (consecutive
// positions pos[r0] ..) and one query head: each K/V block of FA_K positions is read from
// the cache once per tile, not once per row. grid (tiles, n_heads), block 32 * FA_WARPS,
// dynamic shared memory (FA_Q * hd + hd * (FA_K + 1) + FA_K * hd) floats; head_dim a
// multiple of 4, at most 128. tiles[2t] is the tile's first row, tiles[2t + 1] its length.
// Warp w owns rows 8w .. 8w + 8 of the tile; for the scores lane j takes key j of the
// block (K held transposed), for the output lane l owns dimensions 4l .. 4l + 4. Online
// softmax per row, as in `attention`.
#define FA_Q 64
#define FA_K 32
#define FA_WARPS 8
extern "C" __global__ void __launch_bounds__(256)
    attention_tiles(const float* q, const u64* kvp, const int* item, const int* pos,
                    const int* tiles, float* out, int nh, int nkv, int hd, float scale) {
    PDL_ENTRY;
    extern __shared__ float sm[];
    int tI = blockIdx.x, h = blockIdx.y;
    int r0 = tiles[2 * tI], len = tiles[2 * tI + 1];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float* qs = sm;
    float* kt = qs + FA_Q * hd;
    float* vs = kt + hd * (FA_K + 1);
    int kvd = nkv * hd, kh = h / (nh / nkv), nd4 = hd / 4;
    int it = item[r0], p0 = pos[r0], last = p0 + len - 1;
    const bf16* K = (const bf16*)kvp[2 * it] + kh * hd;
    const bf16* V = (const bf16*)kvp[2 * it + 1] + kh * hd;
    for (int e = threadIdx.x; e < FA_Q * hd; e += blockDim.x) {
        int i = e / hd, d = e % hd;
        qs[e] = i < len ? q[((size_t)(r0 + i) * nh + h) * hd + d] * scale : 0.f;
    }
    float m[8], l[8], acc[8][4];
#pragma unroll
    for (int rr = 0; rr < 8; rr++) {
        m[rr] = NEG_INF;
        l[rr] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; i++) acc[rr][i] = 0.f;
    }
    int wfirst = p0 + w * 8;  // the position of this warp's first row
    for (int t0 = 0; t0 <= last; t0 += FA_K) {
        __syncthreads();
        for (int e = threadIdx.x; e < FA_K * nd4; e += blockDim.x) {
            int j = e / nd4, dq = e % nd4, t = t0 + j;
            uint2 ku = make_uint2(0u, 0u), vu = make_uint2(0u, 0u);
            if (t <= last) {
                ku = *(const uint2*)(K + (size_t)t * kvd + 4 * dq);
                vu = *(const uint2*)(V + (size_t)t * kvd + 4 * dq);
            }
            float kf[4], vf[4];
            bf4(ku, kf);
            bf4(vu, vf);
#pragma unroll
            for (int i = 0; i < 4; i++) kt[(4 * dq + i) * (FA_K + 1) + j] = kf[i];
            *(float4*)(vs + j * hd + 4 * dq) = make_float4(vf[0], vf[1], vf[2], vf[3]);
        }
        __syncthreads();
        // Every row of this warp is before the block: nothing to add.
        if (w * 8 >= len || t0 > wfirst + 7) continue;
        float s[8];
#pragma unroll
        for (int rr = 0; rr < 8; rr++) s[rr] = 0.f;
        for (int d = 0; d < hd; d += 4) {
            float k0 = kt[d * (FA_K + 1) + lane], k1 = kt[(d + 1) * (FA_K + 1) + lane];
            float k2 = kt[(d + 2) * (FA_K + 1) + lane], k3 = kt[(d + 3) * (FA_K + 1) + lane];
#pragma unroll
            for (int rr = 0; rr < 8; rr++) {
                float4 qv = *(const float4*)(qs + (w * 8 + rr) * hd + d);
                s[rr] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, s[rr]))));
            }
        }
        int t = t0 + lane;
#pragma unroll
        for (int rr = 0; rr < 8; rr++) {
            bool valid = w * 8 + rr < len && t <= wfirst + rr;
            float sv = valid ? s[rr] : NEG_INF;
            float mn = fmaxf(m[rr], warp_max(sv));
            float corr = mn == NEG_INF ? 1.f : __expf(m[rr] - mn);
            float p = valid ? __expf(sv - mn) : 0.f;
            l[rr] = l[rr] * corr + warp_sum(p);
            m[rr] = mn;
#pragma unroll
            for (int i = 0; i < 4; i++) acc[rr][i] *= corr;
            s[rr] = p;
        }
        int jn = min(FA_K, last - t0 + 1);
        for (int j = 0; j < jn; j++) {
            float4 v = lane < nd4 ? *(const float4*)(vs + j * hd + 4 * lane) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int rr = 0; rr < 8; rr++) {
                float pj = __shfl_sync(0xffffffffu, s[rr], j);
                acc[rr][0] = fmaf(pj, v.x, acc[rr][0]);
                acc[rr][1] = fmaf(pj, v.y, acc[rr][1]);
                acc[rr][2] = fmaf(pj, v.z, acc[rr][2]);
                acc[rr][3] = fmaf(pj, v.w, acc[rr][3]);
            }
        }
    }
    if (lane < nd4) {
#pragma unroll
        for (int rr = 0; rr < 8; rr++) {
            int i = w * 8 + rr;
            if (i >= len) break;
            float inv = 1.f / l[rr];
            float4* o = (float4*)(out + ((size_t)(r0 + i) * nh + h) * hd + 4 * lane);
            *o = make_float4(acc[rr][0] * inv, acc[rr][1] * inv, acc[rr][2] * inv, acc[rr][3] * inv);
        }
    }
}

// silu(g) * u: the gated unit (one expression everywhere, so fused and separate agree).
__device__ __forceinline__ float silu_gate(float g, float u) { return g / (1.f + __expf(-g)) * u; }

// g = silu(g) * u, elementwise.
extern "C" __global__ void silu_mul(float* g, const float* u, u64 n) {
    PDL_ENTRY;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        g[i] = silu_gate(g[i], u[i]);
}

// y = bf16(silu(g) * u), elementwise (the input of a cuBLAS down product).
extern "C" __global__ void silu_mul16(const float* g, const float* u, bf16* y, u64 n) {
    PDL_ENTRY;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = to_bf(silu_gate(g[i], u[i]));
}

// y = bf16(silu(gate) * up) from one product over the joined gate|up matrix: row t of gu is
// f gate outputs, then f up outputs (2f apart); y is [n, f].
extern "C" __global__ void silu_mul16_cat(const float* gu, bf16* y, u64 f, u64 n) {
    PDL_ENTRY;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / f, j = i - t * f;
        const float* r = gu + t * 2 * f;
        y[i] = to_bf(silu_gate(r[j], r[f + j]));
    }
}

extern "C" __global__ void f32_to_bf16(const float* x, bf16* y, u64 n) {
    PDL_ENTRY;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = to_bf(x[i]);
}

__device__ __forceinline__ float dot8(uint4 a, const float* x) {
    float4 x0 = *(const float4*)x, x1 = *(const float4*)(x + 4);
    float s = bf_lo(a.x) * x0.x;
    s = fmaf(bf_hi(a.x), x0.y, s);
    s = fmaf(bf_lo(a.y), x0.z, s);
    s = fmaf(bf_hi(a.y), x0.w, s);
    s = fmaf(bf_lo(a.z), x1.x, s);
    s = fmaf(bf_hi(a.z), x1.y, s);
    s = fmaf(bf_lo(a.w), x1.z, s);
    s = fmaf(bf_hi(a.w), x1.w, s);
    return s;
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// The matrix of a fused product launch that block b works on (blocks are laid out one
// matrix after another, `per` output rows each); b becomes the block's index within it.
struct Seg {
    const bf16* W;
    float* y;
    int rows;
};
__device__ __forceinline__ Seg pick_segment(int& b, int per, const bf16* W0, const bf16* W1,
                                            const bf16* W2, float* y0, float* y1, float* y2,
                                            int r0, int r1, int r2) {
    int nb0 = (r0 + per - 1) / per, nb1 = (r1 + per - 1) / per;
    if (b >= nb0 + nb1) {
        b -= nb0 + nb1;
        return {W2, y2, r2};
    }
    if (b >= nb0) {
        b -= nb0;
        return {W1, y1, r1};
    }
    return {W0, y0, r0};
}

// y[j, o] = sum_i W[o, i] * x[j, i] for the n <= N tokens j of the batch (small batches:
// every weight byte is read once per step). A block of GEMV_WARPS warps computes R output
// rows together: the warps split the row's 16-byte chunks (interleaved, so neighbouring
// warps read neighbouring memory), each lane keeps 2R weight loads in flight and reads each
// x chunk once for all R rows; partial sums meet in shared memory.
//
// Up to three matrices of equal width in one launch and the epilogue `mode`, as for the
// tensor-core products below (MM_ARGS): 0 store, 1 add into y, 2 gated unit (a block takes
// R/2 gate rows and the same R/2 up rows, y0 = silu(gate·x) * (up·x)). The sums are formed
// in the same order in every mode, so a fused launch equals the separate products followed
// by an f32 add or the `silu_mul` kernel bit for bit.
#define GEMV_WARPS 4
// One GEMV chunk: 16-byte column block i, and i + step, of each of the R weight rows.
template <int R>
__device__ __forceinline__ void gemv_load(uint4 (&a)[R], uint4 (&b2)[R], const bf16* const (&wrow)[R],
                                          int i, int step) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const uint4* wr = (const uint4*)wrow[r];
        a[r] = ld_stream(wr + i);
        b2[r] = ld_stream(wr + i + step);
    }
}

// x's 8 values at chunk i scaled by the RMSNorm weight when NORM (nw: the weight, ss: the
// token's running sum of squares of the raw values), as dot8 reads them.
template <bool NORM>
__device__ __forceinline__ void gemv_x8(const float* xr, const float* nw, float* ss, float4* o) {
    float4 x0 = *(const float4*)xr, x1 = *(const float4*)(xr + 4);
    if (NORM) {
        float4 g0 = *(const float4*)nw, g1 = *(const float4*)(nw + 4);
        *ss = fmaf(x0.x, x0.x, *ss);
        *ss = fmaf(x0.y, x0.y, *ss);
        *ss = fmaf(x0.z, x0.z, *ss);
        *ss = fmaf(x0.w, x0.w, *ss);
        *ss = fmaf(x1.x, x1.x, *ss);
        *ss = fmaf(x1.y, x1.y, *ss);
        *ss = fmaf(x1.z, x1.z, *ss);
        *ss = fmaf(x1.w, x1.w, *ss);
        x0 = make_float4(x0.x * g0.x, x0.y * g0.y, x0.z * g0.z, x0.w * g0.w);
        x1 = make_float4(x1.x * g1.x, x1.y * g1.y, x1.z * g1.z, x1.w * g1.w);
    }
    o[0] = x0;
    o[1] = x1;
}

// NORM: x holds the raw residual rows and the product is of their RMSNorm (weight nw, eps):
// each lane multiplies its x chunks by the weight and sums their squares on the way (every
// column is read by exactly one lane of the block), and the block's sums are scaled by
// 1/rms at the end, so no RMSNorm kernel runs before the product (same value as `rmsnorm`
// then the product, up to f32 rounding).
// ROPE (gemv1_qkv_rope): the one-token Q/K/V product (W0/W1/W2 = q/k/v, store) ends with
// rope_kv's work: q rotated into y0, K rotated and V written as bf16 at pos[0] of item[0]'s
// cache (kvp: the layer's K/V pointers per item), so no RoPE kernel runs. A block's 4 rows
// are the two rotated pairs of frequencies 2j and 2j+1 of one head (j = the block's index
// within the head): rows 4j..4j+3 (interleaved pairs) or 2j, 2j+1, 2j+half, 2j+1+half.
struct RopeArgs {
    const int* pos;
    const int* item;
    const float* cos_t;
    const float* sin_t;
    const u64* kvp;
    int hd, inter;
};
// Row k (0..3) of a ROPE block b (within its segment).
__device__ __forceinline__ int rope_row(const RopeArgs& ra, int b, int k) {
    int bph = ra.hd / 4, h = b / bph, j = b % bph;
    return h * ra.hd + (ra.inter ? 4 * j + k : 2 * j + (k & 1) + (k >> 1) * (ra.hd / 2));
}

// 1/rms of token j from the warps' sums of squares (gemv_impl's red_ss).
template <int N>
__device__ __forceinline__ float gemv_inv_rms(const float (&red_ss)[GEMV_WARPS][N], int j,
                                              int cols, float eps) {
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < GEMV_WARPS; k++) q += red_ss[k][j];
    return rsqrtf(q / (float)cols + eps);
}

template <int N, int R, bool NORM, bool ROPE = false>
__device__ void gemv_impl(const bf16* W0, const bf16* W1, const bf16* W2, float* y0, float* y1,
                          float* y2, int r0, int r1, int r2, const float* x, int cols, int n,
                          int mode, const float* nw, float eps, RopeArgs ra = RopeArgs{}) {
    static_assert(!ROPE || (N == 1 && R == 4), "RoPE rides on the one-token, 4-row GEMV");
    __shared__ float red[GEMV_WARPS][R][N];
    __shared__ float red_ss[GEMV_WARPS][N];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int b = blockIdx.x;
    bool glu = mode == 2;
    Seg sg = glu ? Seg{W0, y0, r0} : pick_segment(b, R, W0, W1, W2, y0, y1, y2, r0, r1, r2);
    const bf16* W = sg.W;
    float* y = sg.y;
    int rows = sg.rows;
    // Output rows of this block start at row0; matrix row r of the block is wrow[r].
    int row0 = glu ? b * (R / 2) : b * R;
    const bf16* wrow[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (ROPE) {
            wrow[r] = W + (size_t)rope_row(ra, b, r) * cols;
        } else if (glu) {
            int o = min(row0 + (r % (R / 2)), rows - 1);
            wrow[r] = (r < R / 2 ? W0 : W1) + (size_t)o * cols;
        } else {
            wrow[r] = W + (size_t)min(row0 + r, rows - 1) * cols;
        }
    }
    float acc[R][N], ss[N];
#pragma unroll
    for (int j = 0; j < N; j++) {
        ss[j] = 0.f;
#pragma unroll
        for (int r = 0; r < R; r++) acc[r][j] = 0.f;
    }
    pdl_trigger();
    if ((cols & 7) == 0) {
        int nv = cols >> 3;
        const int step = 32 * GEMV_WARPS;
        int i = w * 32 + lane;
        // The first chunk's weights are requested before waiting for the previous kernel
        // (they are constant), so under PDL they stream while it finishes.
        uint4 a[R], b2[R];
        bool more = i + step < nv;
        if (more) gemv_load<R>(a, b2, wrow, i, step);
        pdl_wait();
        while (more) {
#pragma unroll
            for (int j = 0; j < N; j++) {
                if (j < n) {
                    const float* xr = x + (size_t)j * cols + 8 * i;
                    float4 xa[2], xb[2];
                    gemv_x8<NORM>(xr, nw + 8 * i, &ss[j], xa);
                    gemv_x8<NORM>(xr + 8 * step, nw + 8 * (i + step), &ss[j], xb);
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[r][j] += dot8(a[r], (const float*)xa) + dot8(b2[r], (const float*)xb);
                }
            }
            i += 2 * step;
            more = i + step < nv;
            if (more) gemv_load<R>(a, b2, wrow, i, step);
        }
        for (; i < nv; i += step) {
            uint4 a[R];
#pragma unroll
            for (int r = 0; r < R; r++) a[r] = ld_stream((const uint4*)wrow[r] + i);
#pragma unroll
            for (int j = 0; j < N; j++)
                if (j < n) {
                    float4 xa[2];
                    gemv_x8<NORM>(x + (size_t)j * cols + 8 * i, nw + 8 * i, &ss[j], xa);
#pragma unroll
                    for (int r = 0; r < R; r++) acc[r][j] += dot8(a[r], (const float*)xa);
                }
        }
    } else {
        pdl_wait();
        for (int i = w * 32 + lane; i < cols; i += 32 * GEMV_WARPS) {
            // Each token's input at column i (scaled by the norm weight when NORM).
            float xg[N];
#pragma unroll
            for (int j = 0; j < N; j++) {
                float xv = j < n ? x[(size_t)j * cols + i] : 0.f;
                if (NORM) ss[j] = fmaf(xv, xv, ss[j]);
                xg[j] = NORM ? xv * nw[i] : xv;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wv = bf(wrow[r][i]);
#pragma unroll
                for (int j = 0; j < N; j++)
                    if (j < n) acc[r][j] = fmaf(wv, xg[j], acc[r][j]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < N; j++) {
            float s = warp_sum(acc[r][j]);
            if (lane == 0) red[w][r][j] = s;
        }
    if (NORM) {
#pragma unroll
        for (int j = 0; j < N; j++) {
            float s = warp_sum(ss[j]);
            if (lane == 0) red_ss[w][j] = s;
        }
    }
    __syncthreads();
    if (ROPE) {
        // Thread p < 2: pair p, rows (a, c) of the block; frequency 2j + p.
        int p = threadIdx.x;
        if (p >= 2) return;
        float inv = NORM ? gemv_inv_rms(red_ss, 0, cols, eps) : 1.f;
        int ka = ra.inter ? 2 * p : p, kc = ra.inter ? 2 * p + 1 : p + 2;
        float sa = 0.f, sc = 0.f;
#pragma unroll
        for (int k = 0; k < GEMV_WARPS; k++) {
            sa += red[k][ka][0];
            sc += red[k][kc][0];
        }
        sa *= inv;
        sc *= inv;
        int ra_ = rope_row(ra, b, ka), rc = rope_row(ra, b, kc);
        int pos = ra.pos[0], it = ra.item[0], half = ra.hd / 2;
        int i = 2 * (b % (ra.hd / 4)) + p;
        if (sg.W == W2) {
            bf16* V = (bf16*)ra.kvp[2 * it + 1] + (size_t)pos * r2;
            V[ra_] = to_bf(sa);
            V[rc] = to_bf(sc);
            return;
        }
        float c = ra.cos_t[(size_t)pos * half + i], sn = ra.sin_t[(size_t)pos * half + i];
        float o0 = sa * c - sc * sn, o1 = sa * sn + sc * c;
        if (sg.W == W0) {
            y0[ra_] = o0;
            y0[rc] = o1;
        } else {
            bf16* K = (bf16*)ra.kvp[2 * it] + (size_t)pos * r1;
            K[ra_] = to_bf(o0);
            K[rc] = to_bf(o1);
        }
        return;
    }
    for (int t = threadIdx.x; t < R * N; t += blockDim.x) {
        int r = t / N, j = t % N;
        if (j >= n) continue;
        float inv = NORM ? gemv_inv_rms(red_ss, j, cols, eps) : 1.f;
        if (glu) {
            if (r >= R / 2 || row0 + r >= rows) continue;
            float g = 0.f, u = 0.f;
#pragma unroll
            for (int k = 0; k < GEMV_WARPS; k++) g += red[k][r][j];
#pragma unroll
            for (int k = 0; k < GEMV_WARPS; k++) u += red[k][r + R / 2][j];
            y[(size_t)j * rows + row0 + r] = silu_gate(g * inv, u * inv);
        } else if (row0 + r < rows) {
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < GEMV_WARPS; k++) s += red[k][r][j];
            s *= inv;
            size_t o = (size_t)j * rows + row0 + r;
            y[o] = mode == 1 ? y[o] + s : s;
        }
    }
}

#define MM_ARGS                                                                               \
    const bf16 *W0, const bf16 *W1, const bf16 *W2, float *y0, float *y1, float *y2, int r0,  \
        int r1, int r2, const float *x, int cols, int n, int mode
#define MM_PASS W0, W1, W2, y0, y1, y2, r0, r1, r2, x, cols, n, mode

// Rows per block for up to N tokens (fewer rows as the per-row work grows; even, for the
// gated unit's gate/up halves).
// (GEMV_R4 and GEMV_R8 are tuning macros; the host reads them from SWITCHYARD_KERNEL_DEFINES
// as well, see gemv_rows in src/cuda/forward.rs.)
#define GEMV_R1 4
#define GEMV_R2 4
#ifndef GEMV_R4
#define GEMV_R4 2
#endif
#ifndef GEMV_R8
#define GEMV_R8 2
#endif
// gemvN: the product of x as it is; gemvN_norm: of RMSNorm(x) with weight nw (eps).
#define GEMV_KERNELS(N)                                                                       \
    extern "C" __global__ void gemv##N(MM_ARGS) {                                             \
        gemv_impl<N, GEMV_R##N, false>(MM_PASS, nullptr, 0.f);                                \
    }                                                                                         \
    extern "C" __global__ void gemv##N##_norm(MM_ARGS, const float* nw, float eps) {          \
        gemv_impl<N, GEMV_R##N, true>(MM_PASS, nw, eps);                                      \
    }
GEMV_KERNELS(1)
GEMV_KERNELS(2)
GEMV_KERNELS(4)
GEMV_KERNELS(8)
// One token's Q/K/V of RMSNorm(x) with RoPE and the K/V cache write (see RopeArgs).
extern "C" __global__ void gemv1_qkv_rope(MM_ARGS, const float* nw, float eps, const int* pos,
                                          const int* item, const float* cos_t,
                                          const float* sin_t, const u64* kvp, int hd,
                                          int inter) {
    gemv_impl<1, 4, true, true>(MM_PASS, nw, eps,
                                RopeArgs{pos, item, cos_t, sin_t, kvp, hd, inter});
}

// Deterministic pseudo-random bf16 in [-scale, scale) (dummy weights for benchmarks).
extern "C" __global__ void fill_random(bf16* w, u64 n, u32 seed, float scale) {
    PDL_ENTRY;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 h = i * 0x9E3779B97F4A7C15ull + (u64)seed * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        h *= 0x94D049BB133111EBull;
        h ^= h >> 29;
        float u = (float)((u32)(h >> 40)) * (1.0f / 16777216.0f);
        w[i] = to_bf((2.f * u - 1.f) * scale);
    }
}

// ---- LaRoSA: top-k activation sparsity and products over kept inputs only ----

// Inclusive prefix sum over a warp.
__device__ __forceinline__ u32 warp_incl_scan(u32 v) {
    int lane = threadIdx.x & 31;
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    return v;
}

// Radix select over a block's u32 keys in three passes from the top (bits 31..21, 20..10,
// 9..0, 2048 bins): the k-th largest key (*kth) and how many keys equal to it are among
// the k largest (*need). add(h, shift, mask, prefix) counts every key with (key & mask) ==
// prefix into bin (key >> shift) & 2047 of histogram h (radix_add). Two histograms alternate, so a pass clears the
// next one while it fills its own: three barriers a pass. NT threads (the block): thread t
// scans the 2048 / NT bins from 2047 - t * 2048 / NT down. EARLY: stop after a pass whose chosen bin is kept whole
// (need equals its count); then only the bits in *mask_out are decided, and the k largest
// are the keys with (key & mask) > kth plus those with (key & mask) == kth (all `need` of
// them). Otherwise *mask_out is all ones.
struct RadixShared {
    u32 hist[2][2048];
    u32 warp[32];
    u32 prefix, need, whole;
};
template <int NT, bool EARLY, typename Add>
__device__ void radix_kth(RadixShared& s, u32 k, Add add, u32* kth, u32* need_out,
                          u32* mask_out) {
    int t = threadIdx.x, lane = t & 31, w = t >> 5;
    for (int i = t; i < 2048; i += blockDim.x) s.hist[0][i] = 0u;
    __syncthreads();
    u32 prefix = 0u, need = k, mask = 0u;
    for (int pass = 0; pass < 3; pass++) {
        int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        u32* h = s.hist[pass & 1];
        if (pass < 2)
            for (int i = t; i < 2048; i += blockDim.x) s.hist[(pass + 1) & 1][i] = 0u;
        add(h, shift, mask, prefix);
        __syncthreads();
        constexpr int BPT = 2048 / NT;
        u32 top = 2047u - (u32)(BPT * t);
        u32 cb[BPT], c = 0u;
#pragma unroll
        for (int j = 0; j < BPT; j++) {
            cb[j] = h[top - j];
            c += cb[j];
        }
        u32 inc = warp_incl_scan(c);
        if (lane == 31) s.warp[w] = inc;
        __syncthreads();
        u32 wt = lane < NT / 32 ? s.warp[lane] : 0u;
        u32 wi = warp_incl_scan(wt);
        inc += __shfl_sync(0xffffffffu, wi - wt, w);
        u32 exc = inc - c;
        if (exc < need && need <= inc) {
            u32 acc = exc;
            int j = 0;
            while (acc + cb[j] < need) acc += cb[j++];
            s.prefix = prefix | ((top - (u32)j) << shift);
            s.need = need - acc;
            s.whole = s.need == cb[j];
        }
        __syncthreads();
        prefix = s.prefix;
        need = s.need;
        mask |= 0xffffffffu << shift;
        if (EARLY && s.whole) break;
    }
    *kth = prefix;
    *need_out = need;
    *mask_out = mask;
}

// One key of radix_kth's histogram pass (cand false: no candidate): a predicated
// shared-memory reduction, so the pass has no branch per key.
__device__ __forceinline__ void radix_add(u32* h, u32 key, bool cand, int shift) {
    u32 a = (u32)__cvta_generic_to_shared(&h[(key >> shift) & 2047u]);
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %1, 0;\n\t@p red.shared.add.u32 [%0], 1;\n\t}"
                 :
                 : "r"(a), "r"((u32)cand)
                 : "memory");
}

// The compaction shared by the top-k kernels. topk_flags: bit q of *gtm / *eqm says key q
// is above / equal to the threshold (masked by `mask`; an empty slot, 0xffffffff, is
// neither; `all` keeps every key). topk_write: given `off`, the packed (gt | eq << 16)
// counts of the keys before this thread's, writes the kept ones in index order (mode 0:
// indices and values at their positions in idx/val; mode 1: the row [.., end) to out with
// the dropped values zeroed). Of the keys equal to the threshold the first `need` are kept.
template <int ITEMS>
__device__ __forceinline__ void topk_flags(const u32 (&key)[ITEMS], u32 mask, u32 prefix, bool all,
                                           u32* gtm, u32* eqm) {
    u32 g = 0u, e = 0u;
#pragma unroll
    for (int q = 0; q < ITEMS; q++) {
        u32 kq = key[q], km = kq & mask;
        bool valid = kq != 0xffffffffu;
        g |= (u32)(valid && (all || km > prefix)) << q;
        e |= (u32)(valid && !all && km == prefix) << q;
    }
    *gtm = g;
    *eqm = e;
}
template <int ITEMS>
__device__ __forceinline__ void topk_write(const float (&v)[ITEMS], u32 gtm, u32 eqm, u32 off,
                                           u32 need, int i0, int per, int end, int mode,
                                           int* idx, float* val, float* out) {
    u32 gt_before = off & 0xffffu, eq_before = off >> 16;
    u32 pos = gt_before + min(eq_before, need), eq_seen = eq_before;
#pragma unroll
    for (int q = 0; q < ITEMS; q++) {
        bool e = (eqm >> q) & 1u;
        bool keep = ((gtm >> q) & 1u) || (e && eq_seen < need);
        eq_seen += e;
        int i = i0 + q;
        if (mode == 0) {
            if (keep) {
                idx[pos] = i;
                val[pos] = v[q];
            }
            pos += keep;
        } else if (q < per && i < end) {
            out[i] = keep ? v[q] : 0.f;
        }
    }
}

// Keep the k largest |v| of a row of d values (ties to the lowest index, the CPU plugin's
// top_k). Thread t holds the contiguous values [i0, i0 + per) of the row in v (per <=
// TOPK_ITEMS), TOPK_THREADS threads. Then one block-wide scan of each thread's (above, equal)
// counts places the kept values in index order: mode 0 writes the kept indices (ascending)
// and values to idx/val; mode 1 writes the row to out with the dropped values zeroed.
// 1024 threads (a tuning macro; the host reads it from the kernels' launch bounds): the
// kernel runs on one SM, so twice the warps of 512 hide twice the latency.
#ifndef TOPK_THREADS
#define TOPK_THREADS 1024
#endif
template <int TOPK_ITEMS>
__device__ __forceinline__ void topk_core(const float (&v)[TOPK_ITEMS], int per, int i0, int d, int k, int mode,
                          float* out, int* idx, float* val, RadixShared& s) {
    u32 key[TOPK_ITEMS];
#pragma unroll
    for (int q = 0; q < TOPK_ITEMS; q++)
        key[q] = (q < per && i0 + q < d) ? (__float_as_uint(v[q]) & 0x7fffffffu) : 0xffffffffu;
    bool all = k >= d;
    // k < 1 keeps nothing: no key is above 0xfffffffe (bit 31 is clear) and none equals it.
    u32 prefix = k < 1 ? 0xfffffffeu : 0u, need = k < 1 ? 0u : (u32)k, mask = 0xffffffffu;
    if (!all && k >= 1) {
        auto add = [&](u32* h, int shift, u32 mask, u32 pre) {
#pragma unroll
            for (int q = 0; q < TOPK_ITEMS; q++)
                if (q < per)
                    radix_add(h, key[q], key[q] != 0xffffffffu && (key[q] & mask) == pre, shift);
        };
        radix_kth<TOPK_THREADS, true>(s, (u32)k, add, &prefix, &need, &mask);
    }
    // This thread's counts above / equal to the threshold, packed (d < 65536), then one
    // block-wide exclusive scan places its kept values.
    u32 gtm, eqm, total;
    topk_flags(key, mask, prefix, all, &gtm, &eqm);
    u32 off = block_excl_scan<u32>(__popc(gtm) | (__popc(eqm) << 16), &total);
    topk_write(v, gtm, eqm, off, need, i0, per, d, mode, idx, val, out);
}

// Row blockIdx.x of x (d wide) into registers as topk_core takes it; returns per.
template <int TOPK_ITEMS>
__device__ __forceinline__ int topk_load(const float* xr, int d, float (&v)[TOPK_ITEMS]) {
    int per = (d + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * per;
#pragma unroll
    for (int q = 0; q < TOPK_ITEMS; q++) v[q] = (q < per && i0 + q < d) ? xr[i0 + q] : 0.f;
    return per;
}

// Top-k of each row of x (one block of TOPK_THREADS per row; d <= TOPK_THREADS *
// TOPK_ITEMS): mode 0 kept
// indices and values (row r at r * k), mode 1 the dropped entries of x zeroed in place.
template <int TOPK_ITEMS>
__device__ __forceinline__ void topk_impl(float* x, int d, int k, int* idx, float* val, int mode) {
    __shared__ RadixShared s;
    float* xr = x + (u64)blockIdx.x * d;
    float v[TOPK_ITEMS];
    int per = topk_load(xr, d, v);
    topk_core(v, per, threadIdx.x * per, d, k, mode, xr, idx + (u64)blockIdx.x * k,
              val + (u64)blockIdx.x * k, s);
}

// RMSNorm and top-k in one block per row: out = x / rms(x) * w (as `rmsnorm` computes it),
// then topk_core on it (mode 0: kept indices and values only, out untouched; mode 1: out
// with the dropped values zeroed).
template <int TOPK_ITEMS>
__device__ __forceinline__ void rmsnorm_topk_impl(const float* x, const float* w, float* out,
                                                  int d, float eps, int k, int* idx, float* val,
                                                  int mode) {
    __shared__ RadixShared s;
    const float* xr = x + (u64)blockIdx.x * d;
    float v[TOPK_ITEMS];
    int per = topk_load(xr, d, v);
    int i0 = threadIdx.x * per;
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < TOPK_ITEMS; q++) ss += v[q] * v[q];
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)d + eps);
#pragma unroll
    for (int q = 0; q < TOPK_ITEMS; q++)
        if (q < per && i0 + q < d) v[q] = v[q] * inv * w[i0 + q];
    topk_core(v, per, i0, d, k, mode, out + (u64)blockIdx.x * d, idx + (u64)blockIdx.x * k,
              val + (u64)blockIdx.x * k, s);
}

// Kernels by values per thread (4, 8, 12, 16, 24, 32: the smallest that holds
// ceil(d / TOPK_THREADS), so that no thread walks empty slots).
// SEL_LATE (a tuning macro, default 1): the selections let the next kernel (the sparse
// product) launch only when their blocks exit, not at entry. At entry, the sparse product's
// 264 blocks were let in while the kernel before the selection still ran and sat waiting on
// its SMs (half their registers), and batch-1 LaRoSA decode fell from 251 to 197 tok/s on
// the H200 (bench/results/experiments/README.md).
#ifndef SEL_LATE
#define SEL_LATE 1
#endif
#if SEL_LATE
#define SEL_ENTRY pdl_wait()
#else
#define SEL_ENTRY PDL_ENTRY
#endif
#define TOPK_KERNELS(N)                                                                       \
    extern "C" __global__ void __launch_bounds__(TOPK_THREADS)                                \
        topk##N(float* x, int d, int k, int* idx, float* val, int mode) {                     \
        SEL_ENTRY;                                                                            \
        topk_impl<N>(x, d, k, idx, val, mode);                                                \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(TOPK_THREADS)                                \
        rmsnorm_topk##N(const float* x, const float* w, float* out, int d, float eps, int k,  \
                        int* idx, float* val, int mode) {                                     \
        SEL_ENTRY;                                                                            \
        rmsnorm_topk_impl<N>(x, w, out, d, eps, k, idx, val, mode);                           \
    }
TOPK_KERNELS(4)
TOPK_KERNELS(8)
TOPK_KERNELS(12)
TOPK_KERNELS(16)
TOPK_KERNELS(24)
TOPK_KERNELS(32)

// ---- The same top-k over a cluster of TKC blocks (sm_90+): one row's keys spread over
// TKC SMs, histograms merged through distributed shared memory ----
//
// One block of TOPK_THREADS on one SM is latency bound (ncu: about one instruction per
// cycle). Here block `rank` of the row's cluster holds the contiguous slice
// [rank * S, rank * S + S) of the row (S = ceil(d / TKC)), TKC_THREADS threads with up to
// ITEMS values each. Radix passes of 8-bit digits from bit 30 down (bits 30..23, 22..15,
// 14..7, then 6..0; a pass whose digit is kept whole ends the search): each block counts
// its slice into its own 256-bin histogram, one cluster barrier, then thread t of every
// block adds bin 255 - t of all TKC histograms (in rank order, so every block takes the
// same decision) and the block scans them from the top. Three histograms rotate, so one
// barrier a pass suffices: a block clears the histogram of two passes ago, which every
// block finished reading before the last barrier. RMSNorm's sum of squares and the
// compaction's per-block counts meet the same way; a block exits only after every block
// has read its shared memory. Same answer as topk_core: the k largest |v| (ties to the
// lowest index), in index order.
#define TKC 8
#define TKC_THREADS 256
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TKC_HAVE 1
#define TKC_DIMS __cluster_dims__(TKC, 1, 1)
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync() {
    cluster_arrive();
    cluster_wait();
}
// The u32 at shared address p of cluster block `rank`.
__device__ __forceinline__ u32 ld_dsmem(const void* p, u32 rank) {
    u32 a = (u32)__cvta_generic_to_shared(p), r, v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(r));
    return v;
}
#else
#define TKC_HAVE 0
#define TKC_DIMS
#endif

struct ClusterTopkShared {
    u32 hist[3][TKC_THREADS];
    u32 warp[32];
    u32 prefix, need, whole, total;
    float ss;
};

template <int ITEMS, bool NORM>
__device__ __forceinline__ void topk_cluster_impl(float* x, const float* w, float* out, int d,
                                                  float eps, int k, int* idx, float* val,
                                                  int mode) {
#if TKC_HAVE
    __shared__ ClusterTopkShared s;
    constexpr int NT = TKC_THREADS;
    static_assert(NT == 256, "one 8-bit digit per thread");
    int t = threadIdx.x, lane = t & 31, wi = t >> 5;
    u32 rank = cluster_rank();
    int row = blockIdx.y;
    const float* xr = x + (u64)row * d;
    int S = (d + TKC - 1) / TKC, lo = (int)rank * S, hi = min(d, lo + S);
    int per = (S + NT - 1) / NT, i0 = lo + t * per;
    float v[ITEMS];
#pragma unroll
    for (int q = 0; q < ITEMS; q++) v[q] = (q < per && i0 + q < hi) ? xr[i0 + q] : 0.f;
    if (NORM) {
        float ss = 0.f;
#pragma unroll
        for (int q = 0; q < ITEMS; q++) ss += v[q] * v[q];
        ss = block_sum(ss);
        if (t == 0) s.ss = ss;
        cluster_sync();
        float tot = 0.f;
        for (u32 r = 0; r < TKC; r++) tot += __uint_as_float(ld_dsmem(&s.ss, r));
        float inv = rsqrtf(tot / (float)d + eps);
#pragma unroll
        for (int q = 0; q < ITEMS; q++)
            if (q < per && i0 + q < hi) v[q] = v[q] * inv * w[i0 + q];
    }
    u32 key[ITEMS];
#pragma unroll
    for (int q = 0; q < ITEMS; q++)
        key[q] = (q < per && i0 + q < hi) ? (__float_as_uint(v[q]) & 0x7fffffffu) : 0xffffffffu;
    bool all = k >= d;
    u32 prefix = k < 1 ? 0xfffffffeu : 0u, need = k < 1 ? 0u : (u32)k, mask = 0xffffffffu;
    if (!all && k >= 1) {
        mask = 0u;
        s.hist[0][t] = 0u;
        __syncthreads();
        for (int pass = 0; pass < 4; pass++) {
            // Digits of 8 bits from bit 30 down (bits 30..23, 22..15, 14..7), then 6..0.
            int shift = pass < 3 ? 23 - 8 * pass : 0;
            u32 dm = pass < 3 ? 255u : 127u;
            u32* h = s.hist[pass % 3];
            s.hist[(pass + 1) % 3][t] = 0u;
#pragma unroll
            for (int q = 0; q < ITEMS; q++)
                if (q < per && key[q] != 0xffffffffu && (key[q] & mask) == prefix) {
                    u32 a = (u32)__cvta_generic_to_shared(&h[(key[q] >> shift) & dm]);
                    asm volatile("red.shared.add.u32 [%0], 1;" ::"r"(a) : "memory");
                }
            cluster_sync();
            // Thread t: digit 255 - t, summed over the cluster's blocks in rank order (all
            // loads issued before the first add).
            u32 dg = 255u - (u32)t, part[TKC];
#pragma unroll
            for (u32 r = 0; r < TKC; r++) part[r] = ld_dsmem(&h[dg], r);
            u32 c = 0u;
#pragma unroll
            for (u32 r = 0; r < TKC; r++) c += part[r];
            u32 inc = warp_incl_scan(c);
            if (lane == 31) s.warp[wi] = inc;
            __syncthreads();
            u32 wt = lane < NT / 32 ? s.warp[lane] : 0u;
            u32 wsc = warp_incl_scan(wt);
            inc += __shfl_sync(0xffffffffu, wsc - wt, wi);
            u32 exc = inc - c;
            if (exc < need && need <= inc) {
                s.prefix = prefix | (dg << shift);
                s.need = need - exc;
                s.whole = need - exc == c;
            }
            __syncthreads();
            prefix = s.prefix;
            need = s.need;
            mask |= dm << shift;
            if (s.whole) break;
        }
    }
    u32 gtm, eqm, total;
    topk_flags(key, mask, prefix, all, &gtm, &eqm);
    u32 off = block_excl_scan<u32>(__popc(gtm) | (__popc(eqm) << 16), &total);
    if (t == 0) s.total = total;
    cluster_sync();
    for (u32 r = 0; r < rank; r++) off += ld_dsmem(&s.total, r);
    // This block's reads of the others' shared memory are done; it waits for theirs of its
    // own before it exits.
    cluster_arrive();
    topk_write(v, gtm, eqm, off, need, i0, per, hi, mode, idx + (u64)row * k,
               val + (u64)row * k, out + (u64)row * d);
    cluster_wait();
#endif
}

// Cluster kernels by values per thread (2, 4, 6, 8, 12, 16: d up to TKC * TKC_THREADS * 16 =
// 32,768),
// grid (TKC, rows): topk_cluster takes x (mode 1 masks it in place), rmsnorm_topk_cluster
// normalizes x into out first (mode 1 writes the masked rows there).
#define TOPK_CLUSTER_KERNELS(N)                                                                \
    extern "C" __global__ void __launch_bounds__(TKC_THREADS) TKC_DIMS                         \
        topk_cluster##N(float* x, int d, int k, int* idx, float* val, int mode) {              \
        SEL_ENTRY;                                                                             \
        topk_cluster_impl<N, false>(x, nullptr, x, d, 0.f, k, idx, val, mode);                 \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(TKC_THREADS) TKC_DIMS                         \
        rmsnorm_topk_cluster##N(const float* x, const float* w, float* out, int d, float eps,  \
                                int k, int* idx, float* val, int mode) {                       \
        SEL_ENTRY;                                                                             \
        topk_cluster_impl<N, true>((float*)x, w, out, d, eps, k, idx, val, mode);              \
    }
TOPK_CLUSTER_KERNELS(2)
TOPK_CLUSTER_KERNELS(4)
TOPK_CLUSTER_KERNELS(6)
TOPK_CLUSTER_KERNELS(8)
TOPK_CLUSTER_KERNELS(12)
TOPK_CLUSTER_KERNELS(16)

// y = Wt^T · x over the k kept inputs of one token (idx/val from topk): y[o] = sum_j
// val[j] * Wt[idx[j], o]. Wt is a weight transposed (bf16 [cols, rows]), so a kept input's
// column is one contiguous row, padded to a multiple of 8 outputs (zeros; row stride
// ld = rows rounded up to 8). Up to three matrices in one launch
// and the epilogues of MM_ARGS (0 store, 1 add into y, 2 gated unit: a tile is TILE/2 gate
// outputs and the same TILE/2 up outputs, y0 = silu(gate) * up).
//
// A block of SP_THREADS / 32 warps owns TILE consecutive outputs (TILE/256 warps across
// them, 8 outputs per lane, so each kept input is a TILE*2-byte run) and split blockIdx.y
// of the kept inputs (staged in shared memory, SP_THREADS at a time); the warps across the
// inputs take every (SP_THREADS/32 / (TILE/256))-th one, SP_U loads in flight per lane.
// SP_THREADS is a tuning macro (the host reads the block size from the launch bounds);
// 512 was no faster than 256 on the H200, and 4 loads in flight per lane ran batch-1
// decode about 1 % faster than 8, 3, 6 or 12 (bench/results/experiments/README.md). Partial sums meet in shared memory, then (splits > 1) in `part`; the last block
// of a tile to finish (a ticket in cnt, zero between calls) adds the splits in order and
// applies the epilogue: deterministic, and no second kernel.
#ifndef SP_U
#define SP_U 4
#endif
#ifndef SP_THREADS
#define SP_THREADS 256
#endif
#define SP_CHUNK SP_THREADS
template <int TILE>
__device__ void sparse_mm_impl(const bf16* W0, const bf16* W1, const bf16* W2, float* y0, float* y1,
                               float* y2, int r0, int r1, int r2, const int* __restrict__ idx,
                               const float* __restrict__ val, int k, int mode,
                               float* __restrict__ part, u32* cnt) {
    constexpr int NT = SP_THREADS, OW = TILE / 256, IW = NT / 32 / OW, PT = TILE / NT;
    static_assert(TILE % NT == 0 && IW >= 1, "tile and block size");
    __shared__ float sh[IW][TILE];
    __shared__ int s_idx[SP_CHUNK];
    __shared__ float s_val[SP_CHUNK];
    __shared__ u32 s_ticket;
    int t = threadIdx.x, lane = t & 31, w = t >> 5;
    int ow = w % OW, iw = w / OW;
    int b = blockIdx.x;
    bool glu = mode == 2;
    Seg sg = glu ? Seg{W0, y0, r0} : pick_segment(b, TILE, W0, W1, W2, y0, y1, y2, r0, r1, r2);
    int rows = sg.rows, ld = (rows + 7) & ~7;
    const bf16* W = sg.W;
    int o;
    if (glu) {
        W = ow < OW / 2 ? W0 : W1;
        o = b * (TILE / 2) + (ow % (OW / 2)) * 256 + lane * 8;
    } else {
        o = b * TILE + ow * 256 + lane * 8;
    }
    int per = (k + gridDim.y - 1) / gridDim.y;
    int j0 = blockIdx.y * per, j1 = min(k, j0 + per);
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.f;
    // The split's kept inputs go through shared memory in chunks (one coalesced load), so
    // the weight loads do not wait on index loads.
    for (int c0 = j0; c0 < j1; c0 += SP_CHUNK) {
        int cn = min(SP_CHUNK, j1 - c0);
        __syncthreads();
        if (t < cn) {
            s_idx[t] = idx[c0 + t];
            s_val[t] = val[c0 + t];
        }
        __syncthreads();
        if (o >= rows) continue;
        for (int j = iw; j < cn; j += IW * SP_U) {
            uint4 u[SP_U];
#pragma unroll
            for (int q = 0; q < SP_U; q++) {
                int jq = j + IW * q;
                u[q] = jq < cn ? ld_stream((const uint4*)(W + (u64)s_idx[jq] * ld + o))
                               : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int q = 0; q < SP_U; q++) {
                int jq = j + IW * q;
                float a = jq < cn ? s_val[jq] : 0.f;
                acc[0] = fmaf(bf_lo(u[q].x), a, acc[0]);
                acc[1] = fmaf(bf_hi(u[q].x), a, acc[1]);
                acc[2] = fmaf(bf_lo(u[q].y), a, acc[2]);
                acc[3] = fmaf(bf_hi(u[q].y), a, acc[3]);
                acc[4] = fmaf(bf_lo(u[q].z), a, acc[4]);
                acc[5] = fmaf(bf_hi(u[q].z), a, acc[5]);
                acc[6] = fmaf(bf_lo(u[q].w), a, acc[6]);
                acc[7] = fmaf(bf_hi(u[q].w), a, acc[7]);
            }
        }
    }
    // Tile-local output L = ow * 256 + lane * 8 + e (glu: gate below TILE/2, up above).
    float4* s4 = (float4*)&sh[iw][ow * 256 + lane * 8];
    s4[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    s4[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    __syncthreads();
    // The block's sums, flat by tile-local output (thread t adds the input warps' parts of
    // outputs [t * PT, t * PT + PT) in order).
    float s[PT];
#pragma unroll
    for (int e = 0; e < PT; e++) {
        s[e] = 0.f;
#pragma unroll
        for (int q = 0; q < IW; q++) s[e] += sh[q][t * PT + e];
    }
    __syncthreads();
    float* flat = &sh[0][0];
    float4* flat4 = (float4*)flat;
#pragma unroll
    for (int e = 0; e < PT; e++) flat[t * PT + e] = s[e];
    __syncthreads();
    // From here thread t holds outputs 4c .. 4c + 3 (C4 columns of 4; G groups of threads
    // split the splits when the tile has fewer columns than the block has threads).
    constexpr int C4 = TILE / 4, G = NT / C4;
    int c = t % C4, g = t / C4;
    float4 a = flat4[c];
    if (gridDim.y > 1) {
        u64 vt4 = (u64)gridDim.x * C4, c0 = (u64)blockIdx.x * C4 + c;
        float4* p4 = (float4*)part;
        if (g == 0) p4[blockIdx.y * vt4 + c0] = a;
        __threadfence();
        __syncthreads();
        if (t == 0) s_ticket = atomicAdd(&cnt[blockIdx.x], 1u);
        __syncthreads();
        if (s_ticket != gridDim.y - 1) return;
        __threadfence();
        // The last block adds the splits, each group its own run of them in order, eight
        // loads in flight; then the groups in order: deterministic.
        int S = gridDim.y, pg = (S + G - 1) / G, q0 = min(S, g * pg), q1 = min(S, q0 + pg);
        float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int q = q0; q < q1; q++) {
            float4 v = __ldcg(&p4[q * vt4 + c0]);
            r.x += v.x;
            r.y += v.y;
            r.z += v.z;
            r.w += v.w;
        }
        flat4[g * C4 + c] = r;
        __syncthreads();
        a = flat4[c];
#pragma unroll
        for (int h = 1; h < G; h++) {
            float4 v = flat4[h * C4 + c];
            a.x += v.x;
            a.y += v.y;
            a.z += v.z;
            a.w += v.w;
        }
        if (t == 0) cnt[blockIdx.x] = 0;
    }
    if (glu) {
        // Gate and up halves of the tile meet in shared memory.
        __syncthreads();
        if (g == 0) flat4[c] = a;
        __syncthreads();
        for (int L = t; L < TILE / 2; L += blockDim.x) {
            int out = b * (TILE / 2) + L;
            if (out < rows) y0[out] = silu_gate(flat[L], flat[L + TILE / 2]);
        }
        return;
    }
    if (g == 0) {
        float v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int out = b * TILE + 4 * c + e;
            if (out < rows) sg.y[out] = mode == 1 ? sg.y[out] + v[e] : v[e];
        }
    }
}

#define SP_ARGS                                                                               \
    const bf16 *W0, const bf16 *W1, const bf16 *W2, float *y0, float *y1, float *y2, int r0,  \
        int r1, int r2, const int *idx, const float *val, int k, int mode, float *part, u32 *cnt
#define SP_PASS W0, W1, W2, y0, y1, y2, r0, r1, r2, idx, val, k, mode, part, cnt
extern "C" __global__ void __launch_bounds__(SP_THREADS, 1024 / SP_THREADS) sparse_mm512(SP_ARGS) {
    PDL_ENTRY;
    sparse_mm_impl<512>(SP_PASS);
}
extern "C" __global__ void __launch_bounds__(SP_THREADS, 1024 / SP_THREADS) sparse_mm1024(SP_ARGS) {
    PDL_ENTRY;
    sparse_mm_impl<1024>(SP_PASS);
}

// out[c, r] = in[r, c] (bf16; out's rows ld >= rows apart), 32x32 tiles through shared
// memory; 256 threads per block, grid (ceil(cols / 32), ceil(rows / 32)).
extern "C" __global__ void transpose_bf16(const bf16* in, bf16* out, int rows, int cols, int ld) {
    PDL_ENTRY;
    __shared__ bf16 tile[32][33];
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    int bx = blockIdx.x * 32, by = blockIdx.y * 32;
    for (int j = ty; j < 32; j += 8) {
        int r = by + j, c = bx + tx;
        if (r < rows && c < cols) tile[j][tx] = in[(u64)r * cols + c];
    }
    __syncthreads();
    for (int j = ty; j < 32; j += 8) {
        int c = bx + j, r = by + tx;
        if (c < cols && r < rows) out[(u64)c * ld + r] = tile[tx][j];
    }
}

// ---- Small-batch products on the tensor cores ----
//
// y = W · x for n <= 8*NT tokens, bf16 weights, x f32 rounded to bf16 as it is loaded,
// f32 accumulation (mma.sync m16n8k16, sm_80+). Every weight byte is read once per call.
// A block of MM_WARPS warps owns 16 output rows; the warps split the inputs in 32-wide
// blocks (U consecutive blocks per load round, so each row is read in 64*U-byte runs) and
// meet in shared memory. The 32 inputs of a block are permuted the same way in the weight
// (A) and input (B) fragments: thread (g, t) loads W[row][8t .. 8t+8) as one 16-byte load
// and x[token g][8t .. 8t+8), which two mma steps consume.
//
// Up to three matrices of equal width run in one launch (Q, K and V), blocks laid out one
// matrix after another. mode 0: y = W·x; mode 1: y += W·x (the residual add); mode 2: a
// gated unit, W0 = gate and W1 = up with equal rows: warps 0-3 take gate rows, 4-7 the same
// up rows, and y0 = silu(gate·x) * (up·x).
#define MM_WARPS 8


__device__ __forceinline__ u32 pack_bf2(float a, float b) { return cvt_bf2(a, b); }

__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT>
__device__ __forceinline__ void mm_step(float (*acc)[4], uint4 lo, uint4 hi, const float* x,
                                        int cols, int n, int g, int k) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int j = nt * 8 + g;
        u32 b[4] = {0u, 0u, 0u, 0u};
        if (j < n) {
            const float4* xp = (const float4*)(x + (size_t)j * cols + k);
            float4 p = xp[0], q = xp[1];
            b[0] = pack_bf2(p.x, p.y);
            b[1] = pack_bf2(p.z, p.w);
            b[2] = pack_bf2(q.x, q.y);
            b[3] = pack_bf2(q.z, q.w);
        }
        mma_bf16(acc[nt], lo.x, hi.x, lo.y, hi.y, b[0], b[1]);
        mma_bf16(acc[nt], lo.z, hi.z, lo.w, hi.w, b[2], b[3]);
    }
}

template <int NT, int U>
__device__ void mm_impl(const bf16* W0, const bf16* W1, const bf16* W2, float* y0, float* y1,
                        float* y2, int r0, int r1, int r2, const float* __restrict__ x, int cols,
                        int n, int mode) {
    __shared__ float red[MM_WARPS][16][8 * NT];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int b = blockIdx.x;
    bool glu = mode == 2;
    Seg sg = glu ? Seg{W0, y0, r0} : pick_segment(b, 16, W0, W1, W2, y0, y1, y2, r0, r1, r2);
    const bf16* W = sg.W;
    float* y = sg.y;
    int rows = sg.rows;
    int row0 = b * 16;
    int kw = glu ? (w & 3) : w, nkw = glu ? MM_WARPS / 2 : MM_WARPS;
    const bf16* Wm = (glu && w >= MM_WARPS / 2) ? W1 : W;
    const uint4* ra = (const uint4*)(Wm + (size_t)min(row0 + g, rows - 1) * cols);
    const uint4* rb = (const uint4*)(Wm + (size_t)min(row0 + g + 8, rows - 1) * cols);
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
    int nkb = cols >> 5, nsb = nkb / U;
    for (int sb = kw; sb < nsb; sb += nkw) {
        uint4 lo[U], hi[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = (sb * U + u) * 4 + t;
            lo[u] = ld_stream(ra + c);
            hi[u] = ld_stream(rb + c);
        }
#pragma unroll
        for (int u = 0; u < U; u++) mm_step<NT>(acc, lo[u], hi[u], x, cols, n, g, (sb * U + u) * 32 + 8 * t);
    }
    for (int kb = nsb * U + kw; kb < nkb; kb += nkw) {
        uint4 lo = ld_stream(ra + kb * 4 + t), hi = ld_stream(rb + kb * 4 + t);
        mm_step<NT>(acc, lo, hi, x, cols, n, g, kb * 32 + 8 * t);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int c0 = nt * 8 + 2 * t;
        red[w][g][c0] = acc[nt][0];
        red[w][g][c0 + 1] = acc[nt][1];
        red[w][g + 8][c0] = acc[nt][2];
        red[w][g + 8][c0 + 1] = acc[nt][3];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < 16 * 8 * NT; e += blockDim.x) {
        int r = e / (8 * NT), j = e % (8 * NT);
        if (j >= n || row0 + r >= rows) continue;
        size_t o = (size_t)j * rows + row0 + r;
        if (glu) {
            float gs = 0.f, us = 0.f;
#pragma unroll
            for (int k = 0; k < MM_WARPS / 2; k++) {
                gs += red[k][r][j];
                us += red[k + MM_WARPS / 2][r][j];
            }
            y[o] = silu_gate(gs, us);
        } else {
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < MM_WARPS; k++) s += red[k][r][j];
            y[o] = mode == 1 ? y[o] + s : s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) mm8(MM_ARGS) {
    PDL_ENTRY;
    mm_impl<1, 4>(MM_PASS);
}
extern "C" __global__ void __launch_bounds__(256) mm16(MM_ARGS) {
    PDL_ENTRY;
    mm_impl<2, 4>(MM_PASS);
}
extern "C" __global__ void __launch_bounds__(256) mm32(MM_ARGS) {
    PDL_ENTRY;
    mm_impl<4, 2>(MM_PASS);
}

// ---- Split-K tensor-core products for 1 .. 64 tokens ----
//
// The fused interface of `mm*` (MM_ARGS: up to three matrices of equal width, epilogue
// `mode`) with the inputs staged once per block: block (bx, s) of 8 warps takes 128 matrix
// rows (the gated unit: 64 gate rows in warps 0-3 and the same up rows in warps 4-7) and
// columns [s * ks, s * ks + ks) of the inputs, which it rounds to bf16 into shared memory
// (NTOK = 8 * NT token rows, padded so the B reads are conflict-free). Each warp owns 16
// rows, streams their weights (2U 32-column blocks of both row halves in flight per lane,
// double-buffered; the first U are issued before the inputs are staged) and keeps the NT n-tiles'
// accumulators: no reduction inside the block. Partial sums go to `part` ([splits][row
// tiles][NTOK][128]); the last block of a row tile to finish (a ticket in cnt, zero between
// calls) adds the splits in order and applies the epilogue: deterministic. Dynamic shared
// memory NTOK * ldx * 2 bytes (ldx = ms_ld(ks) in forward.rs); cols and ks multiples of 32.
#define MS_ROWS 128
template <int U>
__device__ __forceinline__ void ms_load(uint4 (&lo)[U], uint4 (&hi)[U], const uint4* ra,
                                        const uint4* rb, int kb, int nkb) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        bool ok = kb + u < nkb;
        lo[u] = ok ? ld_stream(ra + 4 * (kb + u)) : make_uint4(0u, 0u, 0u, 0u);
        hi[u] = ok ? ld_stream(rb + 4 * (kb + u)) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// p[0] + p[stride] + ... + p[(S - 1) * stride] in that order, 8 loads in flight.
__device__ __forceinline__ float ms_sum(const float* p, size_t stride, int S) {
    float s = 0.f;
    for (int q0 = 0; q0 < S; q0 += 8) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = q0 + i < S ? __ldcg(p + (q0 + i) * stride) : 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) s += v[i];
    }
    return s;
}

template <int NT, int U>
__device__ void mms_impl(const bf16* W0, const bf16* W1, const bf16* W2, float* y0, float* y1,
                         float* y2, int r0, int r1, int r2, const float* __restrict__ x,
                         int cols, int n, int mode, float* __restrict__ part, u32* cnt, int ks) {
    constexpr int NTOK = 8 * NT;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16* xs = (bf16*)smraw;
    __shared__ u32 s_ticket;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int b = blockIdx.x;   // becomes the tile's index within its matrix
    bool glu = mode == 2;
    Seg sg = glu ? Seg{W0, y0, r0} : pick_segment(b, MS_ROWS, W0, W1, W2, y0, y1, y2, r0, r1, r2);
    int rows = sg.rows;
    int row0 = glu ? b * (MS_ROWS / 2) : b * MS_ROWS;   // the tile's first output row
    int wrow = row0 + 16 * (glu ? (w & 3) : w);          // this warp's first matrix row
    const bf16* Wm = glu ? (w < 4 ? W0 : W1) : sg.W;
    int k0 = blockIdx.y * ks, kn = min(ks, cols - k0);
    int ldx = (ks & 63) == 32 ? ks : ks + 32;
    bool live = wrow < rows;
    int nkb = live ? kn >> 5 : 0;
    const uint4* ra = (const uint4*)(Wm + (size_t)min(wrow + g, rows - 1) * cols + k0) + t;
    const uint4* rb = (const uint4*)(Wm + (size_t)min(wrow + g + 8, rows - 1) * cols + k0) + t;
    uint4 lo[U], hi[U];
    pdl_trigger();
    ms_load<U>(lo, hi, ra, rb, 0, nkb);   // constant: before the wait (PDL)
    pdl_wait();
    // Stage x[:, k0 .. k0 + kn) as bf16 (token rows past n as zeros), 4 loads in flight
    // per thread.
    int q4 = kn >> 2, total = NTOK * q4;
    for (int e0 = threadIdx.x; e0 < total; e0 += 4 * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int e = e0 + i * blockDim.x, j = e / q4, c = e - j * q4;
            v[i] = e < total && j < n ? *(const float4*)(x + (size_t)j * cols + k0 + 4 * c)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int e = e0 + i * blockDim.x, j = e / q4, c = e - j * q4;
            if (e < total)
                *(uint2*)(xs + j * ldx + 4 * c) =
                    make_uint2(cvt_bf2(v[i].x, v[i].y), cvt_bf2(v[i].z, v[i].w));
        }
    }
    __syncthreads();
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
    const bf16* xl = xs + g * ldx + 8 * t;
    for (int kb = 0; kb < nkb; kb += U) {
        // The next U blocks' loads go out before this batch's products.
        uint4 nlo[U], nhi[U];
        ms_load<U>(nlo, nhi, ra, rb, kb + U, nkb);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (kb + u < nkb) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    uint4 bx = *(const uint4*)(xl + nt * 8 * ldx + 32 * (kb + u));
                    mma_bf16(acc[nt], lo[u].x, hi[u].x, lo[u].y, hi[u].y, bx.x, bx.y);
                    mma_bf16(acc[nt], lo[u].z, hi[u].z, lo[u].w, hi[u].w, bx.z, bx.w);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            lo[u] = nlo[u];
            hi[u] = nhi[u];
        }
    }
    // Partials by (token, tile row); tile row 16w + g (+ 8): gate rows 0-63, up rows 64-127.
    size_t tile_f = (size_t)NTOK * MS_ROWS, split_f = (size_t)gridDim.x * tile_f;
    float* pp = part + blockIdx.y * split_f + blockIdx.x * tile_f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int j = nt * 8 + 2 * t, r = 16 * w + g;
        pp[j * MS_ROWS + r] = acc[nt][0];
        pp[(j + 1) * MS_ROWS + r] = acc[nt][1];
        pp[j * MS_ROWS + r + 8] = acc[nt][2];
        pp[(j + 1) * MS_ROWS + r + 8] = acc[nt][3];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_ticket = atomicAdd(&cnt[blockIdx.x], 1u);
    __syncthreads();
    if (s_ticket != gridDim.y - 1) return;
    __threadfence();
    int S = gridDim.y;
    const float* pt = part + blockIdx.x * tile_f;
    if (glu) {
        for (int e = threadIdx.x; e < NTOK * (MS_ROWS / 2); e += blockDim.x) {
            int j = e / (MS_ROWS / 2), r = e % (MS_ROWS / 2);
            if (j >= n || row0 + r >= rows) continue;
            float gs = ms_sum(pt + j * MS_ROWS + r, split_f, S);
            float us = ms_sum(pt + j * MS_ROWS + r + MS_ROWS / 2, split_f, S);
            y0[(size_t)j * rows + row0 + r] = silu_gate(gs, us);
        }
    } else {
        for (int e = threadIdx.x; e < NTOK * MS_ROWS; e += blockDim.x) {
            int j = e / MS_ROWS, r = e % MS_ROWS;
            if (j >= n || row0 + r >= rows) continue;
            float s = ms_sum(pt + j * MS_ROWS + r, split_f, S);
            size_t o = (size_t)j * rows + row0 + r;
            sg.y[o] = mode == 1 ? sg.y[o] + s : s;
        }
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}

#define MS_ARGS MM_ARGS, float *part, u32 *cnt, int ks
#define MS_PASS MM_PASS, part, cnt, ks
extern "C" __global__ void __launch_bounds__(256) mms8(MS_ARGS) { mms_impl<1, 8>(MS_PASS); }
extern "C" __global__ void __launch_bounds__(256) mms16(MS_ARGS) { mms_impl<2, 8>(MS_PASS); }
extern "C" __global__ void __launch_bounds__(256) mms32(MS_ARGS) { mms_impl<4, 4>(MS_PASS); }
extern "C" __global__ void __launch_bounds__(256) mms64(MS_ARGS) { mms_impl<8, 4>(MS_PASS); }

// ---- Prefill attention on tensor cores ----
//
// The same tiles and causal rule as `attention_tiles`, on bf16 mma.sync (m16n8k16, f32
// accumulation), FlashAttention-2 style: grid (tiles, n_heads), FM_WARPS warps, warp w owns
// query rows 16w .. 16w + 16 of the tile. K and V blocks of FM_K positions are copied from
// the cache into shared memory with cp.async, the next block's copy in flight while the
// current one is used (two buffers, rows padded by 16 bytes so ldmatrix is conflict-free).
// Scores S = Q·Kᵀ come from Q held as A fragments in registers (rounded to bf16 once) and K
// through ldmatrix; the online softmax runs in base 2 on the accumulator fragments, whose
// layout is the A layout of P for P·V (V through ldmatrix.trans). Positions past `last` are
// zero-filled and masked. Dynamic shared memory attention_mma_smem(HD).
#define FM_Q 64
#define FM_K 64
#define FM_WARPS 4

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

template <int HD>
__device__ void attention_mma_impl(const float* q, const u64* kvp, const int* item,
                                   const int* pos, const int* tiles, float* out, int nh, int nkv,
                                   float scale) {
    constexpr int LD = HD + 8;         // padded row, bf16 elements
    constexpr int CH = HD / 8;         // 16-byte chunks per row
    constexpr int KC = HD / 16;        // k16 chunks of the head
    constexpr int NS = FM_K / 8;       // score n-tiles
    constexpr int NO = HD / 8;         // output n-tiles
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16* ks = (bf16*)smraw;           // [2][FM_K][LD]
    bf16* vs = ks + 2 * FM_K * LD;     // [2][FM_K][LD]
    int tI = blockIdx.x, h = blockIdx.y;
    int r0 = tiles[2 * tI], len = tiles[2 * tI + 1];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int kvd = nkv * HD, kh = h / (nh / nkv);
    int it = item[r0], p0 = pos[r0], last = p0 + len - 1;
    const bf16* K = (const bf16*)kvp[2 * it] + kh * HD;
    const bf16* V = (const bf16*)kvp[2 * it + 1] + kh * HD;
    int nkb = last / FM_K + 1;

    auto load = [&](int kb, int buf) {
        int t0 = kb * FM_K;
        for (int e = threadIdx.x; e < FM_K * CH; e += 32 * FM_WARPS) {
            int j = e / CH, c = e % CH, tp = t0 + j;
            bool ok = tp <= last;
            size_t off = (size_t)(ok ? tp : 0) * kvd + 8 * c;
            u32 so = (u32)((buf * FM_K + j) * LD + 8 * c) * 2;
            cp_async16(smem_u32(ks) + so, K + off, ok ? 16u : 0u);
            cp_async16(smem_u32(vs) + so, V + off, ok ? 16u : 0u);
        }
        asm volatile("cp.async.commit_group;");
    };
    load(0, 0);

    // Q of rows g and g + 8 of this warp as A fragments (zero past len).
    int qa = 16 * w + g, qb = qa + 8;
    u32 qf[KC][4];
    {
        const float* qra = q + ((size_t)(r0 + qa) * nh + h) * HD;
        const float* qrb = q + ((size_t)(r0 + qb) * nh + h) * HD;
#pragma unroll
        for (int c = 0; c < KC; c++) {
            int d = 16 * c + 2 * t;
            float2 a0 = qa < len ? *(const float2*)(qra + d) : make_float2(0.f, 0.f);
            float2 a1 = qb < len ? *(const float2*)(qrb + d) : make_float2(0.f, 0.f);
            float2 a2 = qa < len ? *(const float2*)(qra + d + 8) : make_float2(0.f, 0.f);
            float2 a3 = qb < len ? *(const float2*)(qrb + d + 8) : make_float2(0.f, 0.f);
            qf[c][0] = cvt_bf2(a0.x, a0.y);
            qf[c][1] = cvt_bf2(a1.x, a1.y);
            qf[c][2] = cvt_bf2(a2.x, a2.y);
            qf[c][3] = cvt_bf2(a3.x, a3.y);
        }
    }
    const float sl2 = scale * 1.4426950408889634f;
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[n][i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    int pa = p0 + qa, pb = p0 + qb;                    // positions of rows g, g + 8
    int wlast = p0 + min(16 * w + 15, len - 1);        // this warp's last position
    bool active = 16 * w < len;

    for (int kb = 0; kb < nkb; kb++) {
        if (kb + 1 < nkb)
            load(kb + 1, (kb + 1) & 1);
        else
            asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;");
        __syncthreads();
        int t0 = kb * FM_K;
        if (active && t0 <= wlast) {
            u32 kbase = smem_u32(ks) + (u32)((kb & 1) * FM_K * LD) * 2;
            u32 vbase = smem_u32(vs) + (u32)((kb & 1) * FM_K * LD) * 2;
            float s[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++) {
#pragma unroll
                for (int i = 0; i < 4; i++) s[n][i] = 0.f;
                u32 row = kbase + (u32)((8 * n + (lane & 7)) * LD + 8 * (lane >> 3)) * 2;
#pragma unroll
                for (int c = 0; c < KC; c += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(row + 32 * c, b0, b1, b2, b3);
                    mma_bf16(s[n], qf[c][0], qf[c][1], qf[c][2], qf[c][3], b0, b1);
                    mma_bf16(s[n], qf[c + 1][0], qf[c + 1][1], qf[c + 1][2], qf[c + 1][3], b2, b3);
                }
            }
            // Mask, scale to base 2, new row maxima.
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int n = 0; n < NS; n++) {
                int kp = t0 + 8 * n + 2 * t;
                s[n][0] = kp <= pa ? s[n][0] * sl2 : NEG_INF;
                s[n][1] = kp + 1 <= pa ? s[n][1] * sl2 : NEG_INF;
                s[n][2] = kp <= pb ? s[n][2] * sl2 : NEG_INF;
                s[n][3] = kp + 1 <= pb ? s[n][3] * sl2 : NEG_INF;
                mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
            }
#pragma unroll
            for (int sh = 1; sh <= 2; sh <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
            }
            // A row with nothing valid yet keeps max -inf: its weights are all zero.
            float b0m = mx0 == NEG_INF ? 0.f : mx0, b1m = mx1 == NEG_INF ? 0.f : mx1;
            float c0 = exp2f(m0 - b0m), c1 = exp2f(m1 - b1m);
            m0 = mx0;
            m1 = mx1;
            float rs0 = 0.f, rs1 = 0.f;
            u32 pf[NS / 2][4];
#pragma unroll
            for (int n = 0; n < NS; n++) {
                float e0 = exp2f(s[n][0] - b0m), e1 = exp2f(s[n][1] - b0m);
                float e2 = exp2f(s[n][2] - b1m), e3 = exp2f(s[n][3] - b1m);
                rs0 += e0 + e1;
                rs1 += e2 + e3;
                pf[n / 2][(n & 1) * 2] = cvt_bf2(e0, e1);
                pf[n / 2][(n & 1) * 2 + 1] = cvt_bf2(e2, e3);
            }
            l0 = l0 * c0 + rs0;
            l1 = l1 * c1 + rs1;
#pragma unroll
            for (int n = 0; n < NO; n++) {
                o[n][0] *= c0;
                o[n][1] *= c0;
                o[n][2] *= c1;
                o[n][3] *= c1;
            }
            // O += P·V: k = the block's positions (16 at a time), n = head dimensions.
#pragma unroll
            for (int kc = 0; kc < NS / 2; kc++) {
                int mi = lane >> 3;
                u32 row = vbase + (u32)((16 * kc + (lane & 7) + 8 * (mi & 1)) * LD + 8 * (mi >> 1)) * 2;
#pragma unroll
                for (int n = 0; n < NO; n += 2) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(row + 16 * n, b0, b1, b2, b3);
                    mma_bf16(o[n], pf[kc][0], pf[kc][1], pf[kc][2], pf[kc][3], b0, b1);
                    mma_bf16(o[n + 1], pf[kc][0], pf[kc][1], pf[kc][2], pf[kc][3], b2, b3);
                }
            }
        }
        __syncthreads();
    }
    asm volatile("cp.async.wait_group 0;");
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    float i0 = 1.f / l0, i1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < NO; n++) {
        int d = 8 * n + 2 * t;
        if (qa < len)
            *(float2*)(out + ((size_t)(r0 + qa) * nh + h) * HD + d) = make_float2(o[n][0] * i0, o[n][1] * i0);
        if (qb < len)
            *(float2*)(out + ((size_t)(r0 + qb) * nh + h) * HD + d) = make_float2(o[n][2] * i1, o[n][3] * i1);
    }
}

#define ATT_MMA_ARGS                                                                          \
    const float *q, const u64 *kvp, const int *item, const int *pos, const int *tiles,        \
        float *out, int nh, int nkv, int hd, float scale
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS) attention_mma64(ATT_MMA_ARGS) {
    PDL_ENTRY;
    attention_mma_impl<64>(q, kvp, item, pos, tiles, out, nh, nkv, scale);
}
extern "C" __global__ void __launch_bounds__(32 * FM_WARPS) attention_mma128(ATT_MMA_ARGS) {
    PDL_ENTRY;
    attention_mma_impl<128>(q, kvp, item, pos, tiles, out, nh, nkv, scale);
}

// ---- Stream-K tensor-core products for 3 .. 64 tokens over bf16 inputs ----
//
// y = W · x for the decode batches between the GEMV (1-2 tokens) and prefill (cuBLAS), with
// the interface of cuBLAS in the pass (inputs already rounded to bf16 by the kernel
// before: RMSNorm, decode attention, SiLU·up) and the epilogues of the fused products: up
// to three matrices of equal width in one launch (Q, K and V), the residual add, and the
// gated unit, whose result goes out as f32 (mode 2) or, for the down product, as bf16 into
// y16 (mode 3).
//
// The work is a list of units, one per (128-row tile, 128-column step): tile-major, steps
// fastest. A persistent grid (two blocks per SM) splits the list into equal contiguous
// ranges, so every block streams the same number of weight bytes whatever the shape: no
// waves and no tail. Warp w of a block owns 16 rows of the tile (the gated unit: warps 0-3
// gate rows, 4-7 the same up rows) and keeps its accumulators across the steps of a tile.
// Weights go straight to registers (16-byte loads, each lane row g and g + 8 of its 16,
// the next step's loads issued before this step's products; the first before the PDL
// wait); the step's inputs are copied to shared memory with cp.async one step ahead (two
// buffers, rows padded so the B reads are conflict-free). The 32 inputs of a 32-column
// block are permuted alike in the A and B fragments, as in `mm*`.
//
// A tile inside one block's range is finished there (epilogue from registers); a tile cut
// by range ends leaves partial sums in `part` ([tiles][slots][NTOK][128], slot = the
// block's rank among the tile's blocks), and the last of its blocks to arrive (a ticket in
// cnt, zero between calls) adds them in slot order and applies the epilogue:
// deterministic. `total` = tiles * steps per tile; `slots` >= the most blocks on a tile
// (SkPlan in forward.rs). Dynamic shared memory sk_smem(NTOK) bytes.
#define SK_ROWS 128
// 32-column blocks per step (U) and blocks per SM of sk64 (128 registers at two blocks
// spill with U = 4): tuning macros.
#ifndef SK64_U
#define SK64_U 4
#endif
#ifndef SK64_BLOCKS
#define SK64_BLOCKS 1
#endif

#define SK_ARGS                                                                               \
    const bf16 *W0, const bf16 *W1, const bf16 *W2, float *y0, float *y1, float *y2, int r0,  \
        int r1, int r2, const bf16 *__restrict__ x, int cols, int n, int mode, bf16 *y16,     \
        float *part, u32 *cnt, int total, int slots, int tiled
#define SK_PASS                                                                               \
    W0, W1, W2, y0, y1, y2, r0, r1, r2, x, cols, n, mode, y16, part, cnt, total, slots, tiled

// The block whose range holds unit u (ranges [b * total / G, (b + 1) * total / G)).
__device__ __forceinline__ int sk_block(int u, int G, int total) {
    return (int)((((u64)u + 1) * (u64)G - 1) / (u64)total);
}

// Tile T's matrix, output and first row, and warp w's row pointers into it.
struct SkTile {
    const uint4* ra;
    const uint4* rb;
    float* y;
    int rows, row0, wrow;
    int ks;   // uint4 between one 32-column block and the next
    bool live;
};

__device__ __forceinline__ SkTile sk_tile(int T, bool glu, int w, int g, int t, int cols,
                                          const bf16* W0, const bf16* W1, const bf16* W2,
                                          float* y0, float* y1, float* y2, int r0, int r1,
                                          int r2, int tiled) {
    const bf16* W;
    SkTile k;
    if (glu) {
        W = w < 4 ? W0 : W1;
        k.y = y0;
        k.rows = r0;
        k.row0 = T * (SK_ROWS / 2);
    } else {
        int n0 = (r0 + SK_ROWS - 1) / SK_ROWS, n1 = (r1 + SK_ROWS - 1) / SK_ROWS;
        if (T >= n0 + n1) {
            W = W2, k.y = y2, k.rows = r2, k.row0 = (T - n0 - n1) * SK_ROWS;
        } else if (T >= n0) {
            W = W1, k.y = y1, k.rows = r1, k.row0 = (T - n0) * SK_ROWS;
        } else {
            W = W0, k.y = y0, k.rows = r0, k.row0 = T * SK_ROWS;
        }
    }
    k.wrow = k.row0 + 16 * (glu ? (w & 3) : w);
    k.live = k.wrow < k.rows;
    if (tiled) {
        // The fragment layout (tile_w16): the 16-row group's 32-column blocks one after
        // another, 1 KiB each, lane-ordered, rows g then rows g + 8.
        k.ra = (const uint4*)W + (size_t)(min(k.wrow, k.rows - 16) >> 4) * (cols >> 5) * 64 +
               4 * g + t;
        k.rb = k.ra + 32;
        k.ks = 64;
    } else {
        k.ra = (const uint4*)(W + (size_t)min(k.wrow + g, k.rows - 1) * cols) + t;
        k.rb = (const uint4*)(W + (size_t)min(k.wrow + g + 8, k.rows - 1) * cols) + t;
        k.ks = 4;
    }
    return k;
}

// Step s of the tile into (lo, hi): 32-column blocks s*U .. s*U+U-1 of rows g and g + 8
// (zeros past the width, or for a dead warp: nkb 0).
template <int U>
__device__ __forceinline__ void sk_load(uint4 (&lo)[U], uint4 (&hi)[U], const SkTile& k,
                                        int s, int nkb) {
#pragma unroll
    for (int i = 0; i < U; i++) {
        int kb = s * U + i;
        bool ok = kb < nkb;
        lo[i] = ok ? ld_stream(k.ra + k.ks * kb) : make_uint4(0u, 0u, 0u, 0u);
        hi[i] = ok ? ld_stream(k.rb + k.ks * kb) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// Copy step s's inputs (NTOK token rows of U*32 bf16; zeros past n and past the width)
// into the staging buffer xb, asynchronously (one commit group).
template <int NTOK, int U>
__device__ __forceinline__ void sk_stage(bf16* xb, const bf16* __restrict__ x, int s, int n,
                                         int cols) {
    constexpr int PER_ROW = U * 4;   // 16-byte pieces per token row
    for (int e = threadIdx.x; e < NTOK * PER_ROW; e += blockDim.x) {
        int j = e / PER_ROW, c = e % PER_ROW;
        int col = s * U * 32 + 8 * c;
        bool ok = j < n && col < cols;
        const bf16* src = ok ? x + (size_t)j * cols + col : x;
        cp_async16(smem_u32(xb + j * (U * 32 + 8) + 8 * c), src, ok ? 16u : 0u);
    }
    asm volatile("cp.async.commit_group;");
}

__device__ __forceinline__ void sk_out(float* y, bf16* y16, int mode, size_t o, float v) {
    if (mode == 3)
        y16[o] = to_bf(v);
    else if (mode == 1)
        y[o] += v;
    else
        y[o] = v;
}

template <int NT, int U>
__device__ void sk_impl(SK_ARGS) {
    constexpr int NTOK = 8 * NT;
    extern __shared__ __align__(16) unsigned char smraw[];
    bf16* xs = (bf16*)smraw;                                 // [2][NTOK][(U * 32 + 8)]
    float* gx = (float*)(smraw + 2 * NTOK * (U * 32 + 8) * 2);     // [64][NTOK + 1] gate sums
    __shared__ u32 s_ticket;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    bool glu = mode >= 2;
    int nkb = cols >> 5, spt = (nkb + U - 1) / U;
    int G = gridDim.x, b = blockIdx.x;
    int u0 = (int)((u64)b * total / G), u1 = (int)((u64)(b + 1) * total / G);
    pdl_trigger();
    if (u0 >= u1) return;
    int T = u0 / spt, s = u0 % spt;
    SkTile k = sk_tile(T, glu, w, g, t, cols, W0, W1, W2, y0, y1, y2, r0, r1, r2, tiled);
    uint4 lo[U], hi[U];
    sk_load<U>(lo, hi, k, s, k.live ? nkb : 0);   // constant: before the wait (PDL)
    pdl_wait();
    sk_stage<NTOK, U>(xs, x, s, n, cols);
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
    int seg0 = u0;   // first unit of the tile's part in this range
    for (int u = u0; u < u1; u++) {
        int nT = T, ns = s + 1;
        if (ns == spt) nT = T + 1, ns = 0;
        bool more = u + 1 < u1;
        int buf = (u - u0) & 1;
        // This step's inputs have landed, and every warp is done with the other buffer.
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        if (more) sk_stage<NTOK, U>(xs + (buf ^ 1) * NTOK * (U * 32 + 8), x, ns, n, cols);
        SkTile nk = k;
        if (nT != T) nk = sk_tile(nT, glu, w, g, t, cols, W0, W1, W2, y0, y1, y2, r0, r1, r2, tiled);
        uint4 nlo[U], nhi[U];
        sk_load<U>(nlo, nhi, nk, ns, more && nk.live ? nkb : 0);
        const bf16* xl = xs + buf * NTOK * (U * 32 + 8) + g * (U * 32 + 8) + 8 * t;
#pragma unroll
        for (int i = 0; i < U; i++) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                uint4 bx = *(const uint4*)(xl + nt * 8 * (U * 32 + 8) + 32 * i);
                mma_bf16(acc[nt], lo[i].x, hi[i].x, lo[i].y, hi[i].y, bx.x, bx.y);
                mma_bf16(acc[nt], lo[i].z, hi[i].z, lo[i].w, hi[i].w, bx.z, bx.w);
            }
        }
        if (!more || nT != T) {
            // The end of this range's part of tile T.
            int first = T * spt;
            if (seg0 == first && u == first + spt - 1) {
                // The whole tile here: the epilogue from the registers.
                if (!glu) {
                    if (k.live) {
#pragma unroll
                        for (int nt = 0; nt < NT; nt++)
#pragma unroll
                            for (int q = 0; q < 4; q++) {
                                int j = nt * 8 + 2 * t + (q & 1), r = k.wrow + g + 8 * (q >> 1);
                                if (j < n && r < k.rows)
                                    sk_out(k.y, y16, mode, (size_t)j * k.rows + r, acc[nt][q]);
                            }
                    }
                } else {
                    if (w < 4) {
#pragma unroll
                        for (int nt = 0; nt < NT; nt++)
#pragma unroll
                            for (int q = 0; q < 4; q++)
                                gx[(16 * w + g + 8 * (q >> 1)) * (NTOK + 1) + nt * 8 + 2 * t +
                                   (q & 1)] = acc[nt][q];
                    }
                    __syncthreads();
                    if (w >= 4 && k.live) {
#pragma unroll
                        for (int nt = 0; nt < NT; nt++)
#pragma unroll
                            for (int q = 0; q < 4; q++) {
                                int j = nt * 8 + 2 * t + (q & 1), rr = 16 * (w - 4) + g + 8 * (q >> 1);
                                int r = k.row0 + rr;
                                if (j < n && r < k.rows) {
                                    float gs = gx[rr * (NTOK + 1) + j];
                                    sk_out(k.y, y16, mode, (size_t)j * k.rows + r,
                                           silu_gate(gs, acc[nt][q]));
                                }
                            }
                    }
                }
            } else {
                int fb = sk_block(first, G, total);
                int nb = sk_block(first + spt - 1, G, total) - fb + 1;
                size_t tile_f = (size_t)NTOK * SK_ROWS;
                float* pt = part + (size_t)T * slots * tile_f;
                float* pp = pt + (size_t)(b - fb) * tile_f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        int j = nt * 8 + 2 * t + (q & 1), r = 16 * w + g + 8 * (q >> 1);
                        __stcg(pp + j * SK_ROWS + r, acc[nt][q]);
                    }
                __threadfence();
                __syncthreads();
                if (threadIdx.x == 0) s_ticket = atomicAdd(&cnt[T], 1u);
                __syncthreads();
                if (s_ticket == (u32)(nb - 1)) {
                    __threadfence();
                    if (glu) {
                        for (int e = threadIdx.x; e < NTOK * (SK_ROWS / 2); e += blockDim.x) {
                            int j = e / (SK_ROWS / 2), r = e % (SK_ROWS / 2);
                            if (j >= n || k.row0 + r >= k.rows) continue;
                            float gs = ms_sum(pt + j * SK_ROWS + r, tile_f, nb);
                            float us = ms_sum(pt + j * SK_ROWS + r + SK_ROWS / 2, tile_f, nb);
                            sk_out(k.y, y16, mode, (size_t)j * k.rows + k.row0 + r,
                                   silu_gate(gs, us));
                        }
                    } else {
                        for (int e = threadIdx.x; e < NTOK * SK_ROWS; e += blockDim.x) {
                            int j = e / SK_ROWS, r = e % SK_ROWS;
                            if (j >= n || k.row0 + r >= k.rows) continue;
                            float v = ms_sum(pt + j * SK_ROWS + r, tile_f, nb);
                            sk_out(k.y, y16, mode, (size_t)j * k.rows + k.row0 + r, v);
                        }
                    }
                    if (threadIdx.x == 0) cnt[T] = 0;
                }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
            seg0 = u + 1;
        }
        T = nT;
        s = ns;
        k = nk;
#pragma unroll
        for (int i = 0; i < U; i++) {
            lo[i] = nlo[i];
            hi[i] = nhi[i];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256, 2) sk8(SK_ARGS) { sk_impl<1, 4>(SK_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sk16(SK_ARGS) { sk_impl<2, 4>(SK_PASS); }
extern "C" __global__ void __launch_bounds__(256, 2) sk32(SK_ARGS) { sk_impl<4, 4>(SK_PASS); }
extern "C" __global__ void __launch_bounds__(256, SK64_BLOCKS) sk64(SK_ARGS) {
    sk_impl<8, SK64_U>(SK_PASS);
}

// A [rows, cols] bf16 matrix (rows % 16 == 0, cols % 32 == 0) into the fragment layout the
// sk* kernels read with `tiled`: for each 16-row group, its 32-column blocks in order, each
// 1 KiB: 32 lanes' 16 bytes of row g = lane / 4, columns 8 * (lane % 4) .. + 8, then the
// same of row g + 8. A warp's step is then one contiguous run of U KiB, and a row group
// one contiguous run of 32 * cols bytes (as a GEMV's rows), not 16 rows' short pieces.
// One uint4 of the output per thread.
extern "C" __global__ void tile_w16(const uint4* __restrict__ in, uint4* __restrict__ out,
                                    int rows, int cols) {
    u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 nkb = cols >> 5;
    if (o >= (u64)rows * cols / 8) return;
    int lane = o & 31, half = (o >> 5) & 1;
    u64 kb = (o >> 6) % nkb, grp = (o >> 6) / nkb;
    u64 row = grp * 16 + (lane >> 2) + 8 * half;
    out[o] = in[row * (cols >> 3) + kb * 4 + (lane & 3)];
}

// Rotary embedding of row r's query and key heads, then K and V stored at pos[r] of its
// item's cache (rope and kv_write in one launch); grid (n, ceil(((nh + nkv) * hd/2 + kvd) /
// blockDim)): one rotated pair or one V element per thread.
extern "C" __global__ void rope_kv(float* q, float* k, const float* __restrict__ v,
                                   const int* pos, const float* cos_t, const float* sin_t,
                                   const u64* kvp, const int* item, int nh, int nkv, int hd,
                                   int interleaved) {
    PDL_ENTRY;
    int r = blockIdx.x, half = hd / 2, p = pos[r], kvd = nkv * hd;
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    int pairs = (nh + nkv) * half;
    if (j >= pairs + kvd) return;
    int it = item[r];
    if (j >= pairs) {
        int i = j - pairs;
        bf16* V = (bf16*)kvp[2 * it + 1] + (size_t)p * kvd;
        V[i] = to_bf(v[(size_t)r * kvd + i]);
        return;
    }
    int h = j / half, i = j % half;
    float* vr = h < nh ? q + ((size_t)r * nh + h) * hd : k + (size_t)r * kvd + (h - nh) * hd;
    int a = interleaved ? 2 * i : i;
    int b = interleaved ? 2 * i + 1 : i + half;
    float c = cos_t[(size_t)p * half + i], s = sin_t[(size_t)p * half + i];
    float x0 = vr[a], x1 = vr[b];
    float o0 = x0 * c - x1 * s, o1 = x0 * s + x1 * c;
    if (h < nh) {
        vr[a] = o0;
        vr[b] = o1;
    } else {
        bf16* K = (bf16*)kvp[2 * it] + (size_t)p * kvd + (h - nh) * hd;
        K[a] = to_bf(o0);
        K[b] = to_bf(o1);
    }
}

// ---- Sampling on the device: temperature, top-k, top-p ----

// Order-preserving map of a float to u32 (larger float, larger key).
__device__ __forceinline__ u32 fkey(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float fkey_inv(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// One thread's ids walked in order for the sampler: whether top-k keeps each (key > kth,
// or equal to it within the first `need` such ids of the row) and whether it is in the
// final set (with top-p on: key > kp, or equal to it within the first `need_p` such ids
// that top-k keeps). rk and rp are the ranks among equal keys so far (from block scans).
struct KeepWalk {
    u32 kth, need, kp, need_p, rk, rp;
    bool use_p;
    // Returns whether top-k keeps the next id; *keep: whether it stays in the final set.
    __device__ bool next(u32 key, bool* keep) {
        bool in = key > kth || (key == kth && rk < need);
        rk += key == kth;
        bool tie = in && key == kp;
        *keep = in && (!use_p || key > kp || (tie && rp < need_p));
        rp += tie;
        return in;
    }
};

// One row per block (1024 threads), as the host Sampler: greedy when temperature <= 0 or
// top_k == 1 (the lowest id among equal maxima); else the top_k largest logits (ties to
// the lowest id; 0 = all), then the smallest set of those, by weight, holding top_p of
// their mass (ties to the lowest id), weights exp((l - max) / temperature), and the id
// where u times the kept mass falls, the kept ids walked in id order. prm[3r..3r+3] =
// (temperature, top_p, u), topk[r]. Thread t owns ids [t*per, (t+1)*per); the top-k
// threshold is a radix select over the logits' keys (8 bits per pass), the top-p threshold
// the same select over mass.
extern "C" __global__ void __launch_bounds__(1024)
    sample_rows(const float* logits, int vocab, const float* prm, const int* topk, u32* out) {
    PDL_ENTRY;
    __shared__ RadixShared rs;
    __shared__ float fhist[256];
    __shared__ u32 s_sel, s_rem;
    __shared__ float s_above;
    __shared__ float sv[32];
    __shared__ int si[32];
    int r = blockIdx.x;
    const float* L = logits + (size_t)r * vocab;
    float temp = prm[3 * r], top_p = prm[3 * r + 1], u = prm[3 * r + 2];
    int k = topk[r];
    int per = (vocab + blockDim.x - 1) / blockDim.x;
    int lo = min(vocab, (int)threadIdx.x * per), hi = min(vocab, lo + per);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // The maximum and its lowest id (strided: coalesced loads).
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (L[i] > best) {
            best = L[i];
            bi = i;
        }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) {
            best = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sv[w] = best;
        si[w] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < nw; i++)
            if (sv[i] > sv[0] || (sv[i] == sv[0] && si[i] < si[0])) {
                sv[0] = sv[i];
                si[0] = si[i];
            }
    }
    __syncthreads();
    float mx = sv[0];
    int amax = si[0] == 0x7fffffff ? 0 : si[0];
    if (!(temp > 0.f) || k == 1) {
        if (threadIdx.x == 0) out[r] = (u32)amax;
        return;
    }
    float inv_t = 1.f / temp;
    // Top-k: the k-th largest key `kth`, and how many ids equal to it are kept (`need`).
    u32 kth = 0u, need = (u32)vocab;
    if (k > 0 && k < vocab) {
        auto add = [&](u32* h, int shift, u32 mask, u32 prefix) {
            for (int q = 0; q < per; q++) {
                int i = lo + q;
                u32 key = i < hi ? fkey(L[i]) : 0u;
                radix_add(h, key, i < hi && (key & mask) == prefix, shift);
            }
        };
        u32 full;
        radix_kth<1024, false>(rs, (u32)k, add, &kth, &need, &full);
    }
    // in_k(i): key > kth, or key == kth among the first `need` such ids.
    u32 eq = 0u;
    for (int i = lo; i < hi; i++) eq += fkey(L[i]) == kth;
    u32 eq_total;
    u32 eq_before = block_excl_scan<u32>(eq, &eq_total);
    auto weight = [&](int i) { return __expf((L[i] - mx) * inv_t); };
    // This thread's ids walked in order (ties ranked from the block-wide scans).
    auto walk = [&](u32 kp, u32 need_p, u32 rp0, bool use_p) {
        return KeepWalk{kth, need, kp, need_p, eq_before, rp0, use_p};
    };
    // Top-p over the in_k ids: the key `kp` where the mass from the top reaches top_p of the
    // total, the mass strictly above it, and how many ids equal to it are kept.
    u32 kp = 0u, need_p = (u32)vocab;
    if (top_p < 1.f) {
        float part = 0.f;
        KeepWalk kw = walk(0u, 0u, 0u, false);
        bool keep;
        for (int i = lo; i < hi; i++)
            if (kw.next(fkey(L[i]), &keep)) part += weight(i);
        float total;
        block_excl_scan<float>(part, &total);
        float target = top_p * total;
        u32 prefix = 0u, mask = 0u;
        float above = 0.f;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = threadIdx.x; i < 256; i += blockDim.x) fhist[i] = 0.f;
            __syncthreads();
            kw = walk(0u, 0u, 0u, false);
            for (int i = lo; i < hi; i++) {
                u32 key = fkey(L[i]);
                if (kw.next(key, &keep) && (key & mask) == prefix)
                    atomicAdd(&fhist[(key >> shift) & 255u], weight(i));
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                float acc = above;
                int d = 255, last = -1;
                for (; d >= 0; d--) {
                    if (fhist[d] > 0.f) last = d;
                    if (fhist[d] > 0.f && acc + fhist[d] >= target) break;
                    acc += fhist[d];
                }
                // Rounding left the target unreached: take the lowest non-empty bin.
                if (d < 0) {
                    d = last < 0 ? 0 : last;
                    acc -= fhist[d];
                }
                s_sel = (u32)d;
                s_above = acc;
            }
            __syncthreads();
            prefix |= s_sel << shift;
            mask |= 255u << shift;
            above = s_above;
            __syncthreads();
        }
        kp = prefix;
        float we = __expf((fkey_inv(kp) - mx) * inv_t);
        float c = ceilf((target - above) / we);
        need_p = (u32)fmaxf(1.f, c);
    }
    // Rank among in_k ids whose key equals kp (for top-p's ties).
    u32 eqp = 0u;
    {
        KeepWalk kw = walk(kp, need_p, 0u, false);
        bool keep;
        for (int i = lo; i < hi; i++) {
            u32 key = fkey(L[i]);
            eqp += kw.next(key, &keep) && key == kp;
        }
    }
    u32 eqp_total;
    u32 eqp_before = block_excl_scan<u32>(eqp, &eqp_total);
    bool use_p = top_p < 1.f;
    // The kept mass per thread, its prefix, and the draw: the one thread whose range holds
    // u times the kept mass walks it; if rounding leaves the draw past every range, the
    // last kept id.
    __shared__ int s_pick, s_last;
    if (threadIdx.x == 0) {
        s_pick = -1;
        s_last = amax;
    }
    float part = 0.f;
    int last = -1;
    {
        KeepWalk kw = walk(kp, need_p, eqp_before, use_p);
        bool keep;
        for (int i = lo; i < hi; i++) {
            kw.next(fkey(L[i]), &keep);
            if (keep) {
                part += weight(i);
                last = i;
            }
        }
    }
    float total;
    float before = block_excl_scan<float>(part, &total);
    if (last >= 0) atomicMax(&s_last, last);
    float target = u * total;
    if (part > 0.f && target >= before && target < before + part) {
        KeepWalk kw = walk(kp, need_p, eqp_before, use_p);
        bool keep;
        float acc = before;
        int pick = last;
        for (int i = lo; i < hi; i++) {
            kw.next(fkey(L[i]), &keep);
            if (keep) {
                acc += weight(i);
                if (target < acc) {
                    pick = i;
                    break;
                }
            }
        }
        s_pick = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) out[r] = (u32)(s_pick >= 0 ? s_pick : s_last);
}
