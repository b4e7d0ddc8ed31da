// Scatter rows by index ("unpack" / "combine"): dst[idx[r], :] (+)= w[r] * src[r, :].
//
// * scatter_rows_copy_v*: overwrite without weights, done on raw bytes in units of V (like pack.cu).
// * scatter_rows_f32_v4 / _v1: f32 rows, float4 or scalar units; optional weights; overwrite or
//   accumulate (atomicAdd; a vector atomicAdd on sm_90+).
// * scatter_rows_{bf16,f16}_v4 / _v2 / _v1: 16-bit rows, four (one 64-bit word), two (one 32-bit
//   word) or one element per unit;
//   the product and the sum are computed in f32 and rounded once to the 16-bit type; accumulation is a
//   compare-and-swap loop on the 64- or 32-bit word holding the element(s).
//
// Products use __fmul_rn and sums __fadd_rn (never fused), so results match the CPU twin bit for bit
// when no destination row is hit twice. With duplicate indices and accumulate the order of the atomic
// updates is unspecified, so float results may differ from the row-order CPU sum by rounding.
#include "common.cuh"

#define UNROLL 4

// ---------------------------------------------------------------------------------------------------
// Byte copy (overwrite, no weights).

template <typename V>
__device__ __forceinline__ void scatter_rows_copy_impl(const V* __restrict__ src,
                                                       const u32* __restrict__ idx,
                                                       V* __restrict__ dst, u64 n_rows_in,
                                                       u64 n_rows_dst, u64 units_per_row, u32* err) {
    const u64 step = row_step();
    for (u64 r0 = first_row(); r0 < n_rows_in; r0 += step * UNROLL) {
        const V* in[UNROLL];
        V* out[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u64 r = r0 + (u64)k * step;
            in[k] = nullptr;
            out[k] = nullptr;
            if (r < n_rows_in) {
                const u32 d = idx[r];
                if ((u64)d < n_rows_dst) {
                    in[k] = src + r * units_per_row;
                    out[k] = dst + (u64)d * units_per_row;
                } else if (threadIdx.x == 0) {
                    report_bad_index(err, FERRO_ERR_SCATTER, d);
                }
            }
        }
        for (u64 c = threadIdx.x; c < units_per_row; c += blockDim.x) {
            V v[UNROLL] = {};
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) {
                if (in[k] != nullptr) {
                    v[k] = in[k][c];
                }
            }
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) {
                if (out[k] != nullptr) {
                    out[k][c] = v[k];
                }
            }
        }
    }
}

#define SCATTER_ROWS_COPY(NAME, V)                                                                     \
    extern "C" __global__ void NAME(const V* src, const u32* idx, V* dst, u64 n_rows_in,              \
                                    u64 n_rows_dst, u64 units_per_row, u32* err) {                    \
        scatter_rows_copy_impl<V>(src, idx, dst, n_rows_in, n_rows_dst, units_per_row, err);         \
    }

SCATTER_ROWS_COPY(scatter_rows_copy_v16, uint4)
SCATTER_ROWS_COPY(scatter_rows_copy_v8, uint2)
SCATTER_ROWS_COPY(scatter_rows_copy_v4, u32)
SCATTER_ROWS_COPY(scatter_rows_copy_v2, u16)
SCATTER_ROWS_COPY(scatter_rows_copy_v1, u8)

// ---------------------------------------------------------------------------------------------------
// Element operations per unit type.

__device__ __forceinline__ float apply_weight(float s, float w, bool has_w) {
    return has_w ? __fmul_rn(w, s) : s;
}

// f32, one element per unit.
struct F32x1 {
    typedef float Unit;
    __device__ __forceinline__ static void apply(const float* in, float* out, float w, bool has_w,
                                                 bool accumulate) {
        const float v = apply_weight(*in, w, has_w);
        if (accumulate) {
            atomicAdd(out, v);
        } else {
            *out = v;
        }
    }
};

// f32, four elements per unit (16-byte aligned).
struct F32x4 {
    typedef float4 Unit;
    __device__ __forceinline__ static void apply(const float4* in, float4* out, float w, bool has_w,
                                                 bool accumulate) {
        float4 v = *in;
        v.x = apply_weight(v.x, w, has_w);
        v.y = apply_weight(v.y, w, has_w);
        v.z = apply_weight(v.z, w, has_w);
        v.w = apply_weight(v.w, w, has_w);
        if (accumulate) {
#if __CUDA_ARCH__ >= 900
            atomicAdd(out, v);
#else
            atomicAdd(&out->x, v.x);
            atomicAdd(&out->y, v.y);
            atomicAdd(&out->z, v.z);
            atomicAdd(&out->w, v.w);
#endif
        } else {
            *out = v;
        }
    }
};

// 16-bit floats, four elements per unit (one 8-byte aligned 64-bit word): half the atomics of Halfx2.
template <bool BF16>
struct Halfx4 {
    typedef u64 Unit;
    __device__ __forceinline__ static void apply(const u64* in, u64* out, float w, bool has_w,
                                                 bool accumulate) {
        const u64 s = *in;
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[k] = apply_weight(half_to_f32<BF16>((u32)(s >> (16 * k)) & 0xFFFFu), w, has_w);
        }
        if (accumulate) {
            u64 old = *out;
            u64 assumed;
            do {
                assumed = old;
                u64 next = 0ull;
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float cur = half_to_f32<BF16>((u32)(assumed >> (16 * k)) & 0xFFFFu);
                    next |= (u64)f32_to_half<BF16>(__fadd_rn(cur, v[k])) << (16 * k);
                }
                old = atomicCAS(out, assumed, next);
            } while (old != assumed);
        } else {
            u64 next = 0ull;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                next |= (u64)f32_to_half<BF16>(v[k]) << (16 * k);
            }
            *out = next;
        }
    }
};

// 16-bit floats, two elements per unit (one 4-byte aligned 32-bit word).
template <bool BF16>
struct Halfx2 {
    typedef u32 Unit;
    __device__ __forceinline__ static void apply(const u32* in, u32* out, float w, bool has_w,
                                                 bool accumulate) {
        const u32 s = *in;
        const float lo = apply_weight(half_to_f32<BF16>(s & 0xFFFFu), w, has_w);
        const float hi = apply_weight(half_to_f32<BF16>(s >> 16), w, has_w);
        if (accumulate) {
            u32 old = *out;
            u32 assumed;
            do {
                assumed = old;
                const u32 nlo = f32_to_half<BF16>(__fadd_rn(half_to_f32<BF16>(assumed & 0xFFFFu), lo));
                const u32 nhi = f32_to_half<BF16>(__fadd_rn(half_to_f32<BF16>(assumed >> 16), hi));
                old = atomicCAS(out, assumed, nlo | (nhi << 16));
            } while (old != assumed);
        } else {
            *out = f32_to_half<BF16>(lo) | (f32_to_half<BF16>(hi) << 16);
        }
    }
};

// 16-bit floats, one element per unit. Accumulation CASes the aligned 32-bit word holding the element
// (the other half is written back unchanged, atomically).
template <bool BF16>
struct Halfx1 {
    typedef u16 Unit;
    __device__ __forceinline__ static void apply(const u16* in, u16* out, float w, bool has_w,
                                                 bool accumulate) {
        const float v = apply_weight(half_to_f32<BF16>((u32)*in), w, has_w);
        if (accumulate) {
            u32* word = (u32*)((size_t)out & ~(size_t)3);
            const u32 shift = ((size_t)out & 2) ? 16u : 0u;
            u32 old = *word;
            u32 assumed;
            do {
                assumed = old;
                const u32 cur = (assumed >> shift) & 0xFFFFu;
                const u32 next = f32_to_half<BF16>(__fadd_rn(half_to_f32<BF16>(cur), v));
                old = atomicCAS(word, assumed, (assumed & ~(0xFFFFu << shift)) | (next << shift));
            } while (old != assumed);
        } else {
            *out = (u16)f32_to_half<BF16>(v);
        }
    }
};

template <typename Op>
__device__ __forceinline__ void scatter_rows_float_impl(const typename Op::Unit* __restrict__ src,
                                                        const u32* __restrict__ idx,
                                                        const float* __restrict__ weights,
                                                        typename Op::Unit* dst, u64 n_rows_in,
                                                        u64 n_rows_dst, u64 units_per_row,
                                                        u32 accumulate, u32* err) {
    typedef typename Op::Unit U;
    const bool has_w = weights != nullptr;
    const bool acc = accumulate != 0u;
    const u64 step = row_step();
    for (u64 r0 = first_row(); r0 < n_rows_in; r0 += step * UNROLL) {
        const U* in[UNROLL];
        U* out[UNROLL];
        float w[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u64 r = r0 + (u64)k * step;
            in[k] = nullptr;
            out[k] = nullptr;
            w[k] = 1.0f;
            if (r < n_rows_in) {
                const u32 d = idx[r];
                if ((u64)d < n_rows_dst) {
                    in[k] = src + r * units_per_row;
                    out[k] = dst + (u64)d * units_per_row;
                    if (has_w) {
                        w[k] = weights[r];
                    }
                } else if (threadIdx.x == 0) {
                    report_bad_index(err, FERRO_ERR_SCATTER, d);
                }
            }
        }
        for (u64 c = threadIdx.x; c < units_per_row; c += blockDim.x) {
#pragma unroll
            for (int k = 0; k < UNROLL; ++k) {
                if (in[k] != nullptr) {
                    Op::apply(in[k] + c, out[k] + c, w[k], has_w, acc);
                }
            }
        }
    }
}

#define SCATTER_ROWS_FLOAT(NAME, OP)                                                                   \
    extern "C" __global__ void NAME(const OP::Unit* src, const u32* idx, const float* weights,       \
                                    OP::Unit* dst, u64 n_rows_in, u64 n_rows_dst, u64 units_per_row,  \
                                    u32 accumulate, u32* err) {                                       \
        scatter_rows_float_impl<OP>(src, idx, weights, dst, n_rows_in, n_rows_dst, units_per_row,     \
                                    accumulate, err);                                                 \
    }

SCATTER_ROWS_FLOAT(scatter_rows_f32_v4, F32x4)
SCATTER_ROWS_FLOAT(scatter_rows_f32_v1, F32x1)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v4, Halfx4<true>)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v2, Halfx2<true>)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v1, Halfx1<true>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v4, Halfx4<false>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v2, Halfx2<false>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v1, Halfx1<false>)
