// Fused GLM-masked attention for minglm: forward and backward, float32, one head size per compile.
//
// What it computes (docs/mask.md): for sample b, key j is visible to query i when j < sep[b] or j <= i.
//   o = softmax(scale * q k^T + mask) v,   lse = log of each row's softmax denominator (saved for the backward).
// The mask is evaluated from sep[b] on the fly: no T×T buffer exists anywhere, in global or shared memory.
// Rows i >= len[b] (padding at the end; len[b] = T when the caller has no lengths) are treated as absent:
// o = 0, lse = 0, no gradient. A real row never sees a pad key because sep <= len. Padding is never trusted:
// q, k, v, dO rows >= len load as 0 and padded outputs are written as 0 (not "acc * 0"), because a masked
// probability is 0 but 0 * NaN is NaN, and a caller's padding may hold anything.
//
// The NumPy twin (twin.py) runs the same algorithm with the same online-softmax recurrence and is where the
// derivation lives; the tests check the twin against plain attention. Layout: q, k, v, o, do, dq, dk, dv are
// contiguous (B, H, T, D) float32; lse and delta are (B, H, T) float32; sep and len are (B,) int32.
//
// Compile with -DHEAD_DIM=32, 64 or 128 (NVRTC or nvcc). NVRTC has no host headers and no INFINITY macro, so
// -inf is __int_as_float(0xff800000). Shared memory is dynamic; the launcher (cuda.py) reads the sizes and tile
// constants back from the tiny smem_floats kernel and raises the per-kernel limit where a size is above 48 KiB.
// -DSMALL_TILES=1 builds smaller query tiles (16 forward rows, 8 backward rows) for GPUs whose per-block limit
// (MaxSharedMemoryPerBlockOptin) is below the default tiles' need: 64 KiB on a T4, 48 KiB on Pascal. cuda.py
// picks the variant per kernel and per device.
// CPU checks: nvrtc_check.py compiles this file with NVRTC; emulate.py runs it unchanged, thread by thread, on a CPU.
//
// Forward kernel, glm_attn_fwd: one block = (query tile of FWD_BQ rows, head, sample), 4 warps. A warp owns
//   FWD_ROWS query rows; a key tile is 32 keys, one per lane, so a row's 32 scores live one per lane and the
//   row max / row sum are warp shuffles (no score tile in shared memory). For each row the warp runs the
//   recurrence  m' = max(m, max s);  l' = e^(m-m') l + sum e^(s-m');  acc' = e^(m-m') acc + e^(s-m') V.
//   Key tiles past max(last query of the tile, sep[b]) are fully masked and never loaded.
//
// Backward: delta_i = rowsum(dO_i * O_i) is computed by the launcher (one CuPy reduction). Then glm_attn_bwd:
//   one block = (key tile of BWD_BK = 32 keys, head, sample), 4 warps. It keeps dK, dV for its keys in
//   registers and loops over the query tiles that can see those keys (all of them when the key tile starts
//   before sep[b], else those from the diagonal on). Per query tile, three phases separated by __syncthreads:
//     A. P = exp(S - lse) and dS = P * (dO V^T - delta) for the 32×32 tile, into shared memory;
//     B. dV += P^T dO and dK += dS^T (scale Q), accumulated in registers (each thread owns fixed (key, dim)s);
//     C. dQ += scale * dS K, added to a float32 global buffer with atomicAdd, because many key-tile blocks
//        touch the same query rows. That costs one atomic per (row, dim) per tile pair, which was chosen over
//        a second kernel that loops over key tiles per query tile (it would recompute S and P a second time).
//
// Resources, NVRTC 13.5 `-Xptxas -v` (python -m minglm.kernels.nvrtc_check prints them for sm_75, sm_80 and
// sm_90 and fails on any spill): 0 bytes spill stores / loads for every kernel; registers on sm_90 (sm_75, sm_80):
//   HEAD_DIM  32: glm_attn_fwd 114 (117, 117), 17,024 B smem, 64-row tiles | glm_attn_bwd  80 (72, 72), 25,088 B
//   HEAD_DIM  64: glm_attn_fwd 128 (122, 124), 33,408 B smem, 64-row tiles | glm_attn_bwd  96 (91, 91), 41,472 B
//   HEAD_DIM 128: glm_attn_fwd 108 (105, 107), 49,792 B smem, 32-row tiles | glm_attn_bwd 128 (128, 128), 74,240 B
//   HEAD_DIM 128, SMALL_TILES: glm_attn_fwd 41,600 B, 16-row tiles | glm_attn_bwd 43,328 B, 8-row query tiles
// Shared memory is all dynamic (bytes = 4 * *_SMEM_FLOATS). __launch_bounds__(NTHREADS, MIN_BLOCKS) caps the
// registers at 128 (64K registers / (4 blocks * 128 threads)): with only the thread count, NVRTC 13.5 chose 96
// registers and spilled 12 B in glm_attn_fwd at HEAD_DIM 32 for sm_75 and sm_80. At 128 registers a block uses
// 16K of an SM's 64K registers, so up to 4 blocks (16 warps) are resident per SM.
// Left out: dropout, half-precision loads (cuda.py casts float16 to float32 first), tensor cores (mma), K/V cache
// decoding, and memory ("mems") columns.

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=32, -DHEAD_DIM=64 or -DHEAD_DIM=128"
#endif

#ifndef SMALL_TILES
#define SMALL_TILES 0
#endif

constexpr int D = HEAD_DIM;
static_assert(D % 32 == 0 && D >= 32 && D <= 128, "HEAD_DIM must be 32, 64 or 128");
constexpr int WARP = 32;
constexpr int NWARPS = 4;
constexpr int NTHREADS = NWARPS * WARP;  // 128 threads per block, both kernels
constexpr int MIN_BLOCKS = 4;            // blocks per SM that __launch_bounds__ asks ptxas to allow for
constexpr int DPL = D / WARP;            // head dims per lane: lane owns dims lane, lane + 32, ...
constexpr int DPAD = D + 1;              // row stride of tiles read "one row per lane": odd, so no bank conflicts

// forward tiling
constexpr int FWD_ROWS = SMALL_TILES ? 4 : (D == 128) ? 8 : 16;  // query rows per warp (fewer at D 128: registers)
constexpr int FWD_BQ = NWARPS * FWD_ROWS;      // query rows per block
constexpr int FWD_BK = WARP;                   // keys per tile: one per lane
// shared memory (floats): Q tile (FWD_BQ x D), K tile (FWD_BK x DPAD), V tile (FWD_BK x D), P rows (NWARPS x 32)
constexpr int FWD_SMEM_FLOATS = FWD_BQ * D + FWD_BK * DPAD + FWD_BK * D + NWARPS * WARP;

// backward tiling
constexpr int BWD_BQ = SMALL_TILES ? 8 : 32;  // query rows per inner tile
constexpr int BWD_BK = WARP;                   // keys per block: one per lane in phase A
static_assert(BWD_BQ % NWARPS == 0 && BWD_BK % NWARPS == 0, "rows and keys are dealt out to the warps evenly");
// shared memory (floats): K, V (BWD_BK x DPAD each), Q, dO (BWD_BQ x D each), P, dS (BWD_BQ x BWD_BK each),
// lse, delta (BWD_BQ each)
constexpr int BWD_SMEM_FLOATS = 2 * BWD_BK * DPAD + 2 * BWD_BQ * D + 2 * BWD_BQ * BWD_BK + 2 * BWD_BQ;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_max(float x) {
    for (int off = WARP / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int off = WARP / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// The GLM mask: query i sees key j (both < T) when j is in Part A (j < sep) or not in its future (j <= i).
__device__ __forceinline__ bool glm_visible(int i, int j, int sep) { return j < sep || j <= i; }

// Exposed so that the launcher can check its own copy of the shared-memory sizes against the compiled ones.
extern "C" __global__ void smem_floats(int* out) {
    out[0] = FWD_SMEM_FLOATS;
    out[1] = BWD_SMEM_FLOATS;
    out[2] = FWD_BQ;
    out[3] = BWD_BK;
    out[4] = BWD_BQ;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, MIN_BLOCKS)
glm_attn_fwd(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
             const int* __restrict__ sep_arr, const int* __restrict__ len_arr, float* __restrict__ o,
             float* __restrict__ lse, int H, int T, float scale) {
    extern __shared__ float smem[];
    float* Qs = smem;                    // (FWD_BQ, D), pre-scaled
    float* Ks = Qs + FWD_BQ * D;         // (FWD_BK, DPAD)
    float* Vs = Ks + FWD_BK * DPAD;      // (FWD_BK, D)
    float* Ps = Vs + FWD_BK * D;         // (NWARPS, 32): one row of probabilities per warp

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int i0 = blockIdx.x * FWD_BQ, h = blockIdx.y, b = blockIdx.z;
    const int sep = sep_arr[b], len = len_arr[b];
    const size_t head = ((size_t)b * H + h) * (size_t)T;  // first row of this (sample, head)
    const int i_end = min(i0 + FWD_BQ, T);                // rows [i0, i_end) exist

    if (i0 >= len) {  // the whole tile is padding: absent rows
        for (int e = tid; e < (i_end - i0) * D; e += NTHREADS) o[(head + i0) * D + e] = 0.f;
        for (int r = tid; r < i_end - i0; r += NTHREADS) lse[head + i0 + r] = 0.f;
        return;
    }

    for (int e = tid; e < FWD_BQ * D; e += NTHREADS) {  // load Q (padded rows, and rows past T, as 0), scaled
        const int r = e / D;
        Qs[e] = (i0 + r < len) ? q[(head + i0) * D + e] * scale : 0.f;
    }

    float m[FWD_ROWS], l[FWD_ROWS], acc[FWD_ROWS][DPL];  // running max, sum, numerator (one set per row)
#pragma unroll
    for (int n = 0; n < FWD_ROWS; ++n) {
        m[n] = neg_inf();
        l[n] = 0.f;
#pragma unroll
        for (int u = 0; u < DPL; ++u) acc[n][u] = 0.f;
    }

    // keys >= max(last row + 1, sep) are invisible to every row of the tile, and keys >= len to every real row
    const int kv_end = min(len, max(i_end, sep));
    for (int j0 = 0; j0 < kv_end; j0 += FWD_BK) {
        __syncthreads();  // everyone is done with the previous K, V tile (and Q is loaded, first time)
        for (int e = tid; e < FWD_BK * D; e += NTHREADS) {
            const int c = e / D, d = e % D;
            const bool in = j0 + c < len;  // padded keys load as 0: 0 * NaN would poison real rows
            Ks[c * DPAD + d] = in ? k[(head + j0) * D + e] : 0.f;
            Vs[c * D + d] = in ? v[(head + j0) * D + e] : 0.f;
        }
        __syncthreads();

        const int j = j0 + lane;  // this lane's key
#pragma unroll
        for (int n = 0; n < FWD_ROWS; ++n) {
            const int r = warp + NWARPS * n;  // row within the tile
            const int i = i0 + r;
            float s = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) s += Qs[r * D + d] * Ks[lane * DPAD + d];
            s = (j < len && glm_visible(i, j, sep)) ? s : neg_inf();

            const float m_new = fmaxf(m[n], warp_max(s));
            const float m_ref = (m_new == neg_inf()) ? 0.f : m_new;  // a row with nothing visible yet stays 0
            const float p = expf(s - m_ref);
            const float alpha = expf(m[n] - m_ref);  // rescales the old sums; 0 on the first visible tile
            l[n] = alpha * l[n] + warp_sum(p);
            m[n] = m_new;

            Ps[warp * WARP + lane] = p;
            __syncwarp();
#pragma unroll
            for (int u = 0; u < DPL; ++u) {
                float pv = 0.f;
#pragma unroll 8
                for (int c = 0; c < FWD_BK; ++c) pv += Ps[warp * WARP + c] * Vs[c * D + lane + WARP * u];
                acc[n][u] = alpha * acc[n][u] + pv;
            }
            __syncwarp();  // Ps is rewritten by the next row
        }
    }

#pragma unroll
    for (int n = 0; n < FWD_ROWS; ++n) {
        const int i = i0 + warp + NWARPS * n;
        if (i >= T) continue;
        const bool real = i < len;
        const float inv_l = real ? 1.f / l[n] : 0.f;  // every real row sees key 0, so l > 0
#pragma unroll
        for (int u = 0; u < DPL; ++u) o[(head + i) * D + lane + WARP * u] = real ? acc[n][u] * inv_l : 0.f;
        if (lane == 0) lse[head + i] = real ? m[n] + logf(l[n]) : 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS, MIN_BLOCKS)
glm_attn_bwd(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
             const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
             const int* __restrict__ sep_arr, const int* __restrict__ len_arr, float* __restrict__ dq,
             float* __restrict__ dk, float* __restrict__ dv, int H, int T, float scale) {
    extern __shared__ float smem[];
    float* Ks = smem;                     // (BWD_BK, DPAD)
    float* Vs = Ks + BWD_BK * DPAD;       // (BWD_BK, DPAD)
    float* Qs = Vs + BWD_BK * DPAD;       // (BWD_BQ, D), pre-scaled
    float* dOs = Qs + BWD_BQ * D;         // (BWD_BQ, D)
    float* Ps = dOs + BWD_BQ * D;         // (BWD_BQ, BWD_BK)
    float* dSs = Ps + BWD_BQ * BWD_BK;    // (BWD_BQ, BWD_BK)
    float* lse_s = dSs + BWD_BQ * BWD_BK; // (BWD_BQ,)
    float* delta_s = lse_s + BWD_BQ;      // (BWD_BQ,)

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const int j0 = blockIdx.x * BWD_BK, h = blockIdx.y, b = blockIdx.z;
    const int sep = sep_arr[b], len = len_arr[b];
    const size_t head = ((size_t)b * H + h) * (size_t)T;
    const int j_end = min(j0 + BWD_BK, len);  // keys [j0, j_end) are real

    for (int e = tid; e < BWD_BK * D; e += NTHREADS) {
        const int c = e / D, d = e % D;
        const bool in = j0 + c < len;  // padded keys load as 0
        Ks[c * DPAD + d] = in ? k[(head + j0) * D + e] : 0.f;
        Vs[c * DPAD + d] = in ? v[(head + j0) * D + e] : 0.f;
    }

    // this thread's share of dK, dV: keys c = warp + NWARPS * n, dims lane + 32 * u
    constexpr int KEYS_PER_WARP = BWD_BK / NWARPS;
    float dk_acc[KEYS_PER_WARP][DPL], dv_acc[KEYS_PER_WARP][DPL];
#pragma unroll
    for (int n = 0; n < KEYS_PER_WARP; ++n)
#pragma unroll
        for (int u = 0; u < DPL; ++u) dk_acc[n][u] = dv_acc[n][u] = 0.f;

    // query rows that can see these keys: all rows when the tile starts inside Part A, else rows from the
    // diagonal on; rows >= len are absent. When j0 >= len no real row sees the tile and the loop is empty.
    const int i_start = (j0 < sep) ? 0 : (j0 / BWD_BQ) * BWD_BQ;
    const int i_stop = (j0 < len) ? len : 0;
    for (int i0 = i_start; i0 < i_stop; i0 += BWD_BQ) {
        __syncthreads();  // previous tile's Q, dO, P, dS are no longer read (and K, V are loaded, first time)
        for (int e = tid; e < BWD_BQ * D; e += NTHREADS) {
            const int r = e / D;
            const bool in = i0 + r < len;  // absent rows load as 0
            Qs[e] = in ? q[(head + i0) * D + e] * scale : 0.f;
            dOs[e] = in ? dout[(head + i0) * D + e] : 0.f;
        }
        for (int r = tid; r < BWD_BQ; r += NTHREADS) {
            const bool in = i0 + r < len;
            lse_s[r] = in ? lse[head + i0 + r] : 0.f;
            delta_s[r] = in ? delta[head + i0 + r] : 0.f;
        }
        __syncthreads();

        // A: P and dS for (row r = warp + NWARPS * n, key c = lane)
        const int j = j0 + lane;
        for (int n = 0; n < BWD_BQ / NWARPS; ++n) {
            const int r = warp + NWARPS * n;
            const int i = i0 + r;
            float s = 0.f, dp = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                s += Qs[r * D + d] * Ks[lane * DPAD + d];
                dp += dOs[r * D + d] * Vs[lane * DPAD + d];
            }
            const bool vis = i < len && j < j_end && glm_visible(i, j, sep);
            const float p = vis ? expf(s - lse_s[r]) : 0.f;
            Ps[r * BWD_BK + lane] = p;
            dSs[r * BWD_BK + lane] = p * (dp - delta_s[r]);
        }
        __syncthreads();

        // B: dV[c] += sum_r P[r][c] dO[r];  dK[c] += sum_r dS[r][c] (scale Q[r])
#pragma unroll
        for (int n = 0; n < KEYS_PER_WARP; ++n) {
            const int c = warp + NWARPS * n;
#pragma unroll 4
            for (int r = 0; r < BWD_BQ; ++r) {
                const float p = Ps[r * BWD_BK + c], ds = dSs[r * BWD_BK + c];
#pragma unroll
                for (int u = 0; u < DPL; ++u) {
                    dv_acc[n][u] += p * dOs[r * D + lane + WARP * u];
                    dk_acc[n][u] += ds * Qs[r * D + lane + WARP * u];
                }
            }
        }

        // C: dQ[r] += scale * sum_c dS[r][c] K[c], shared with other key-tile blocks, hence atomicAdd
        for (int n = 0; n < BWD_BQ / NWARPS; ++n) {
            const int r = warp + NWARPS * n;
            if (i0 + r >= len) continue;  // absent row (also covers rows past T)
#pragma unroll
            for (int u = 0; u < DPL; ++u) {
                const int d = lane + WARP * u;
                float g = 0.f;
#pragma unroll 8
                for (int c = 0; c < BWD_BK; ++c) g += dSs[r * BWD_BK + c] * Ks[c * DPAD + d];
                atomicAdd(&dq[(head + i0 + r) * D + d], g * scale);
            }
        }
    }

#pragma unroll
    for (int n = 0; n < KEYS_PER_WARP; ++n) {
        const int j = j0 + warp + NWARPS * n;
        if (j >= T) continue;
        const bool real = j < len;  // a padded key gets no gradient: write 0, whatever the sums hold
#pragma unroll
        for (int u = 0; u < DPL; ++u) {
            dk[(head + j) * D + lane + WARP * u] = real ? dk_acc[n][u] : 0.f;
            dv[(head + j) * D + lane + WARP * u] = real ? dv_acc[n][u] : 0.f;
        }
    }
}
