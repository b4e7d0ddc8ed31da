// Deep Gradient Compression kernels (Lin et al., ICLR 2018). Self-contained (no headers) so NVRTC can
// compile it alone. Every kernel has a CPU twin in src/dgc/select.rs with the same semantics; arithmetic
// is never fused (__fmul_rn/__fadd_rn), so u, v and the candidate *sets* are bit-identical to the twin's.
// Only the order of compacted candidates differs (warp-aggregated atomics); the host sorts them.
//
//   dgc_sum_squares  sum of g^2 in f64 (local clipping)                       twin: sum_squares
//   dgc_sample       |v'| at hashed sample indices, v' the would-be accumulator twin: sample_magnitudes
//   dgc_kth_largest  one-block radix select of the r-th largest of a sample    twin: kth_largest
//   dgc_fused        clip-scale + momentum + accumulate + threshold + compact  twin: fused_update_select
//   dgc_select       threshold + compact only (threshold correction)           twin: select_above
//   dgc_mask         remove sent values from v, zero u (momentum masking)      twin: mask_sent
//   dgc_scatter_add_fixed  decode gathered fixed-k messages, dense += v        twin: wire::decode_average
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define FULL_MASK 0xFFFFFFFFu
#define PAD_INDEX 0xFFFFFFFFu

__device__ __forceinline__ u64 mix64(u64 z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 sample_index(u64 seed, u64 step, u64 j, u64 n) {
    return mix64(seed ^ mix64((step * 0xd1b54a32d192ed03ULL) ^ j)) % n;
}

// One element's update: returns v', writes u'.
__device__ __forceinline__ float dgc_apply(float g, float u, float v, float scale, float m, int mc,
                                           float* u_out) {
    const float sg = (scale == 1.0f) ? g : __fmul_rn(scale, g);
    if (mc) {
        const float u2 = __fadd_rn(__fmul_rn(m, u), sg);
        *u_out = u2;
        return __fadd_rn(v, u2);
    }
    *u_out = u;
    return __fadd_rn(v, sg);
}

__device__ __forceinline__ bool dgc_passes(float v, float thr) {
    return v != 0.0f && fabsf(v) >= thr;
}

// Warp-aggregated compaction: every lane of the warp must call it (pred may be false). One atomic per
// warp with at least one candidate. Slots at or beyond cap are counted but not stored.
__device__ __forceinline__ void warp_compact(bool pred, u32 i, float v, u32 cap, u32* out_idx,
                                             float* out_val, u32* count) {
    const u32 ballot = __ballot_sync(FULL_MASK, pred);
    if (ballot == 0u) {
        return;
    }
    const u32 lane = threadIdx.x & 31u;
    const u32 leader = __ffs(ballot) - 1u;
    u32 base = 0;
    if (lane == leader) {
        base = atomicAdd(count, (u32)__popc(ballot));
    }
    base = __shfl_sync(FULL_MASK, base, leader);
    if (pred) {
        const u32 slot = base + (u32)__popc(ballot & ((1u << lane) - 1u));
        if (slot < cap) {
            out_idx[slot] = i;
            out_val[slot] = v;
        }
    }
}

extern "C" __global__ void dgc_sum_squares(const float* __restrict__ g, u64 n, double* out) {
    __shared__ double part[32];
    double acc = 0.0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double x = (double)g[i];
        acc += x * x;
    }
    for (int o = 16; o > 0; o >>= 1) {
        acc += __shfl_down_sync(FULL_MASK, acc, o);
    }
    if ((threadIdx.x & 31u) == 0u) {
        part[threadIdx.x >> 5] = acc;
    }
    __syncthreads();
    if (threadIdx.x < 32u) {
        acc = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_down_sync(FULL_MASK, acc, o);
        }
        if (threadIdx.x == 0u) {
            atomicAdd(out, acc);
        }
    }
}

extern "C" __global__ void dgc_sample(const float* __restrict__ g, const float* __restrict__ u,
                                      const float* __restrict__ v, u64 n, float scale, float m, int mc,
                                      u64 seed, u64 step, u64 s, float* out) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < s; j += stride) {
        const u64 i = sample_index(seed, step, j, n);
        float u2;
        out[j] = fabsf(dgc_apply(g[i], u[i], v[i], scale, m, mc, &u2));
    }
}

// The rank-th largest magnitude (1-based, rank <= s) of xs[0..s), by a 4-pass 8-bit radix select on
// the float bits (for non-negative floats the bit patterns order like the values). One block.
extern "C" __global__ void dgc_kth_largest(const float* __restrict__ xs, u32 s, u32 rank, float* out) {
    __shared__ u32 hist[256];
    __shared__ u32 prefix_s, want_s;
    if (threadIdx.x == 0u) {
        prefix_s = 0u;
        want_s = rank;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 b = threadIdx.x; b < 256u; b += blockDim.x) {
            hist[b] = 0u;
        }
        __syncthreads();
        const u32 prefix = prefix_s;
        const u32 hi_mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
        for (u32 j = threadIdx.x; j < s; j += blockDim.x) {
            const u32 bits = __float_as_uint(fabsf(xs[j]));
            if ((bits & hi_mask) == (prefix & hi_mask)) {
                atomicAdd(&hist[(bits >> shift) & 0xFFu], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0u) {
            u32 want = want_s;
            int b = 255;
            for (; b > 0; --b) {
                if (hist[b] >= want) {
                    break;
                }
                want -= hist[b];
            }
            prefix_s = prefix | ((u32)b << shift);
            want_s = want;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0u) {
        *out = __uint_as_float(prefix_s);
    }
}

// The fused pass. Vectorised (float4) over the first n4 = n/4*4 elements, scalar tail. Grid-stride
// loops whose bounds are warp-uniform, so every lane reaches the ballots.
extern "C" __global__ void dgc_fused(const float* __restrict__ g, float* __restrict__ u,
                                     float* __restrict__ v, u64 n, float scale, float m, int mc, float thr,
                                     u32 cap, u32* out_idx, float* out_val, u32* count) {
    const u64 nvec = n / 4u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* u4 = reinterpret_cast<float4*>(u);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (u64 base = (u64)blockIdx.x * blockDim.x; base < nvec; base += stride) {
        const u64 q = base + threadIdx.x;
        const bool active = q < nvec;
        float4 gv = make_float4(0.f, 0.f, 0.f, 0.f), uv = gv, vv = gv;
        if (active) {
            gv = g4[q];
            uv = u4[q];
            vv = v4[q];
            vv.x = dgc_apply(gv.x, uv.x, vv.x, scale, m, mc, &uv.x);
            vv.y = dgc_apply(gv.y, uv.y, vv.y, scale, m, mc, &uv.y);
            vv.z = dgc_apply(gv.z, uv.z, vv.z, scale, m, mc, &uv.z);
            vv.w = dgc_apply(gv.w, uv.w, vv.w, scale, m, mc, &uv.w);
            if (mc) {
                u4[q] = uv;
            }
            v4[q] = vv;
        }
        const u32 i0 = (u32)(q * 4u);
        const bool px = active && dgc_passes(vv.x, thr);
        const bool py = active && dgc_passes(vv.y, thr);
        const bool pz = active && dgc_passes(vv.z, thr);
        const bool pw = active && dgc_passes(vv.w, thr);
        if (__any_sync(FULL_MASK, px || py || pz || pw)) {
            warp_compact(px, i0, vv.x, cap, out_idx, out_val, count);
            warp_compact(py, i0 + 1u, vv.y, cap, out_idx, out_val, count);
            warp_compact(pz, i0 + 2u, vv.z, cap, out_idx, out_val, count);
            warp_compact(pw, i0 + 3u, vv.w, cap, out_idx, out_val, count);
        }
    }
    // Tail (< 4 elements): block 0, first warp.
    if (blockIdx.x == 0u && threadIdx.x < 32u) {
        const u64 i = nvec * 4u + threadIdx.x;
        const bool active = i < n;
        float vv = 0.0f;
        if (active) {
            float u2;
            vv = dgc_apply(g[i], u[i], v[i], scale, m, mc, &u2);
            u[i] = u2;
            v[i] = vv;
        }
        warp_compact(active && dgc_passes(vv, thr), (u32)i, vv, cap, out_idx, out_val, count);
    }
}

extern "C" __global__ void dgc_select(const float* __restrict__ v, u64 n, float thr, u32 cap,
                                      u32* out_idx, float* out_val, u32* count) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 base = (u64)blockIdx.x * blockDim.x; base < n; base += stride) {
        const u64 i = base + threadIdx.x;
        const float x = i < n ? v[i] : 0.0f;
        warp_compact(i < n && dgc_passes(x, thr), (u32)i, x, cap, out_idx, out_val, count);
    }
}

extern "C" __global__ void dgc_mask(float* u, float* v, const u32* __restrict__ idx,
                                    const float* __restrict__ sent, u32 cnt, int mask_momentum) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < cnt; j += stride) {
        const u32 i = idx[j];
        const float s = sent[j];
        const float x = v[i];
        v[i] = (x == s) ? 0.0f : __fadd_rn(x, -s);
        if (mask_momentum) {
            u[i] = 0.0f;
        }
    }
}

// Gathered fixed-k messages: world blocks of [u32 count][k x u32 idx][k x value], values f32 (bf16 = 0)
// or bf16 (bf16 = 1). dense[idx] += value (atomics; PAD_INDEX skipped; out-of-range indices flag err).
// The caller zeroes dense first and scales by 1/world afterwards (or folds it into the optimizer).
extern "C" __global__ void dgc_scatter_add_fixed(const unsigned char* __restrict__ msgs, u32 world, u32 k,
                                                 int bf16, float* dense, u64 n, u32* err) {
    const u64 vb = bf16 ? 2u : 4u;
    const u64 msg_len = 4u + (u64)k * (4u + vb);
    const u64 total = (u64)world * k;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const u64 r = t / k, j = t % k;
        const unsigned char* msg = msgs + r * msg_len;
        const u32 i = reinterpret_cast<const u32*>(msg + 4)[j];
        if (i == PAD_INDEX) {
            continue;
        }
        float x;
        if (bf16) {
            const u32 h = reinterpret_cast<const u16*>(msg + 4 + 4u * (u64)k)[j];
            x = __uint_as_float(h << 16);
        } else {
            x = reinterpret_cast<const float*>(msg + 4 + 4u * (u64)k)[j];
        }
        if ((u64)i < n) {
            atomicAdd(dense + i, x);
        } else if (atomicCAS(err, 0u, 4u) == 0u) {
            err[1] = i;
        }
    }
}

// Keep the candidates whose magnitude is >= thr (the top k of the candidate list, thr being the k-th
// largest candidate magnitude), at most cap of them.
extern "C" __global__ void dgc_filter(const u32* __restrict__ idx_in, const float* __restrict__ val_in,
                                      u32 cnt, float thr, u32 cap, u32* idx_out, float* val_out,
                                      u32* count) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 base = blockIdx.x * blockDim.x; base < cnt; base += stride) {
        const u32 j = base + threadIdx.x;
        const float x = j < cnt ? val_in[j] : 0.0f;
        warp_compact(j < cnt && dgc_passes(x, thr), j < cnt ? idx_in[j] : 0u, x, cap, idx_out, val_out,
                     count);
    }
}
