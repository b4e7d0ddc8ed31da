// Scatter rows by index ("unpack" / "combine"): dst[idx[r], :] (+)= w[r] * src[r, :].
//
// * scatter_rows_copy_v*: overwrite without weights, done on raw bytes in units of V (like pack.cu).
// * scatter_rows_f32_v4 / _v1: f32 rows, float4 or scalar units; optional weights; overwrite or
//   accumulate (atomicAdd; a vector atomicAdd on sm_90+).
// * scatter_rows_{bf16,f16}_v8 / _v4 / _v2 / _v1: 16-bit rows, eight (one 16-byte vector), four (one
//   64-bit word), two (one 32-bit word) or one element per unit. The product w * s is computed in f32.
//   Overwrite rounds it once to the 16-bit type. Accumulate uses the native 16-bit atomic add where
//   the architecture has it (PTX red.global.add.noftz: f16/f16x2 from sm_70, bf16/bf16x2 and the
//   vector forms .v2/.v4 of f16x2/bf16x2 from sm_90): the addend is the 16-bit value itself, so with
//   weights the product is rounded to the 16-bit type first and the hardware then rounds the sum (two
//   roundings per add instead of the CPU twin's one; without weights the addend is the source value,
//   exact, and the result is bit-identical to the CPU twin's). Elsewhere (bf16 before sm_90, f16
//   before sm_70) accumulation is a compare-and-swap loop on the 64- or 32-bit word holding the
//   element(s) that computes d + w * s in f32 and rounds once, as the CPU twin does.
//
// Products use __fmul_rn and sums __fadd_rn (never fused), so results match the CPU twin bit for bit
// when no destination row is hit twice, except for weighted 16-bit accumulation on the native path
// (above). With duplicate indices and accumulate the order of the atomic updates is unspecified, so
// float results may differ from the row-order CPU sum by rounding.
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
// Native 16-bit float atomic adds (PTX red.global.add.noftz, relaxed, gpu scope; round to nearest
// even, subnormals kept). The preprocessor keeps each form away from architectures that lack it
// (ptxas rejects them); NATIVE_RED<BF16> says whether the scalar and x2 forms exist, NATIVE_RED_VEC
// whether the .v2/.v4 packed vector forms do.

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FERRO_RED_BF16 1
#define FERRO_RED_VEC 1
#else
#define FERRO_RED_BF16 0
#define FERRO_RED_VEC 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#define FERRO_RED_F16 1
#else
#define FERRO_RED_F16 0
#endif

template <bool BF16>
struct NativeRed {
    static constexpr bool scalar = BF16 ? FERRO_RED_BF16 != 0 : FERRO_RED_F16 != 0;
    static constexpr bool vec = FERRO_RED_VEC != 0;
};

// [p] += {lo, hi}: one 32-bit word of two 16-bit floats.
template <bool BF16>
__device__ __forceinline__ void red_add_x2(u32* p, u32 v) {
    if (BF16) {
#if FERRO_RED_BF16
        asm volatile("red.global.add.noftz.bf16x2 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#endif
    } else {
#if FERRO_RED_F16
        asm volatile("red.global.add.noftz.f16x2 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#endif
    }
}

// [p] += v: one 16-bit float (2-byte aligned).
template <bool BF16>
__device__ __forceinline__ void red_add_x1(u16* p, u16 v) {
    if (BF16) {
#if FERRO_RED_BF16
        asm volatile("red.global.add.noftz.bf16 [%0], %1;" ::"l"(p), "h"(v) : "memory");
#endif
    } else {
#if FERRO_RED_F16
        asm volatile("red.global.add.noftz.f16 [%0], %1;" ::"l"(p), "h"(v) : "memory");
#endif
    }
}

// [p] += four 16-bit floats (8-byte aligned): one .v2 vector red.
template <bool BF16>
__device__ __forceinline__ void red_add_x4_vec(u64* p, u32 a, u32 b) {
#if FERRO_RED_VEC
    if (BF16) {
        asm volatile("red.global.v2.bf16x2.add.noftz [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b)
                     : "memory");
    } else {
        asm volatile("red.global.v2.f16x2.add.noftz [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b)
                     : "memory");
    }
#endif
}

// [p] += eight 16-bit floats (16-byte aligned): one .v4 vector red.
template <bool BF16>
__device__ __forceinline__ void red_add_x8_vec(uint4* p, uint4 v) {
#if FERRO_RED_VEC
    if (BF16) {
        asm volatile("red.global.v4.bf16x2.add.noftz [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
                     "r"(v.y), "r"(v.z), "r"(v.w)
                     : "memory");
    } else {
        asm volatile("red.global.v4.f16x2.add.noftz [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
                     "r"(v.y), "r"(v.z), "r"(v.w)
                     : "memory");
    }
#endif
}

// ---------------------------------------------------------------------------------------------------
// Element operations per unit type. apply(s, out, ...) gets the source unit already loaded; kPreload
// says whether the row loop issues the loads of all UNROLL rows before the first apply (true for all:
// measured on an H100 it was as fast or faster for f32 too, 0.81-0.83 of a copy for accumulation).

__device__ __forceinline__ float apply_weight(float s, float w, bool has_w) {
    return has_w ? __fmul_rn(w, s) : s;
}

// f32, one element per unit.
struct F32x1 {
    typedef float Unit;
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(float s, float* out, float w, bool has_w,
                                                 bool accumulate) {
        const float v = apply_weight(s, w, has_w);
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
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(float4 v, float4* out, float w, bool has_w,
                                                 bool accumulate) {
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

// Two 16-bit floats of a 32-bit word, weighted in f32 and each rounded once to the 16-bit type (the
// word itself when there is no weight: exact). Used only by the native-atomic paths. From sm_80 the
// conversions are the hardware's (cvt: exact widening, round to nearest even with subnormals kept),
// bit-identical to the software ones of common.cuh except for NaN payloads, which arithmetic does not
// preserve anyway (see the module docs).
template <bool BF16>
__device__ __forceinline__ u32 weigh_x2(u32 s, float w, bool has_w) {
    if (!has_w) {
        return s;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float lo, hi;
    if (BF16) {
        lo = __uint_as_float(s << 16);
        hi = __uint_as_float(s & 0xFFFF0000u);
    } else {
        asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((u16)(s & 0xFFFFu)));
        asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((u16)(s >> 16)));
    }
    lo = __fmul_rn(w, lo);
    hi = __fmul_rn(w, hi);
    u32 r;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
#else
    const u32 lo = f32_to_half<BF16>(__fmul_rn(w, half_to_f32<BF16>(s & 0xFFFFu)));
    const u32 hi = f32_to_half<BF16>(__fmul_rn(w, half_to_f32<BF16>(s >> 16)));
    return lo | (hi << 16);
#endif
}

// Compare-and-swap fallback: [out] += v (four f32 addends), each sum computed in f32 and rounded once.
template <bool BF16>
__device__ __forceinline__ void cas_add_x4(u64* out, const float v[4]) {
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
}

// Compare-and-swap fallback: [out] += {lo, hi}, each sum computed in f32 and rounded once.
template <bool BF16>
__device__ __forceinline__ void cas_add_x2(u32* out, float lo, float hi) {
    u32 old = *out;
    u32 assumed;
    do {
        assumed = old;
        const u32 nlo = f32_to_half<BF16>(__fadd_rn(half_to_f32<BF16>(assumed & 0xFFFFu), lo));
        const u32 nhi = f32_to_half<BF16>(__fadd_rn(half_to_f32<BF16>(assumed >> 16), hi));
        old = atomicCAS(out, assumed, nlo | (nhi << 16));
    } while (old != assumed);
}

// Four f32 values (w * s, or s) of the four 16-bit floats of a 64-bit word.
template <bool BF16>
__device__ __forceinline__ void widen_x4(u64 s, float w, bool has_w, float v[4]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[k] = apply_weight(half_to_f32<BF16>((u32)(s >> (16 * k)) & 0xFFFFu), w, has_w);
    }
}

template <bool BF16>
__device__ __forceinline__ u64 narrow_x4(const float v[4]) {
    u64 next = 0ull;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        next |= (u64)f32_to_half<BF16>(v[k]) << (16 * k);
    }
    return next;
}

// 16-bit floats, eight elements per unit (one 16-byte aligned vector).
template <bool BF16>
struct Halfx8 {
    typedef uint4 Unit;
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(uint4 s, uint4* out, float w, bool has_w,
                                                 bool accumulate) {
        if (accumulate && NativeRed<BF16>::scalar) {
            uint4 a;
            a.x = weigh_x2<BF16>(s.x, w, has_w);
            a.y = weigh_x2<BF16>(s.y, w, has_w);
            a.z = weigh_x2<BF16>(s.z, w, has_w);
            a.w = weigh_x2<BF16>(s.w, w, has_w);
            if (NativeRed<BF16>::vec) {
                red_add_x8_vec<BF16>(out, a);
            } else {
                u32* o = (u32*)out;
                red_add_x2<BF16>(o, a.x);
                red_add_x2<BF16>(o + 1, a.y);
                red_add_x2<BF16>(o + 2, a.z);
                red_add_x2<BF16>(o + 3, a.w);
            }
            return;
        }
        const u64 s_lo = (u64)s.x | ((u64)s.y << 32);
        const u64 s_hi = (u64)s.z | ((u64)s.w << 32);
        float lo[4], hi[4];
        widen_x4<BF16>(s_lo, w, has_w, lo);
        widen_x4<BF16>(s_hi, w, has_w, hi);
        if (accumulate) {
            u64* o = (u64*)out;
            cas_add_x4<BF16>(o, lo);
            cas_add_x4<BF16>(o + 1, hi);
        } else {
            const u64 n_lo = narrow_x4<BF16>(lo);
            const u64 n_hi = narrow_x4<BF16>(hi);
            *out = make_uint4((u32)n_lo, (u32)(n_lo >> 32), (u32)n_hi, (u32)(n_hi >> 32));
        }
    }
};

// 16-bit floats, four elements per unit (one 8-byte aligned 64-bit word).
template <bool BF16>
struct Halfx4 {
    typedef u64 Unit;
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(u64 s, u64* out, float w, bool has_w,
                                                 bool accumulate) {
        if (accumulate && NativeRed<BF16>::scalar) {
            const u32 a = weigh_x2<BF16>((u32)s, w, has_w);
            const u32 b = weigh_x2<BF16>((u32)(s >> 32), w, has_w);
            if (NativeRed<BF16>::vec) {
                red_add_x4_vec<BF16>(out, a, b);
            } else {
                red_add_x2<BF16>((u32*)out, a);
                red_add_x2<BF16>((u32*)out + 1, b);
            }
            return;
        }
        float v[4];
        widen_x4<BF16>(s, w, has_w, v);
        if (accumulate) {
            cas_add_x4<BF16>(out, v);
        } else {
            *out = narrow_x4<BF16>(v);
        }
    }
};

// 16-bit floats, two elements per unit (one 4-byte aligned 32-bit word).
template <bool BF16>
struct Halfx2 {
    typedef u32 Unit;
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(u32 s, u32* out, float w, bool has_w,
                                                 bool accumulate) {
        if (accumulate && NativeRed<BF16>::scalar) {
            red_add_x2<BF16>(out, weigh_x2<BF16>(s, w, has_w));
            return;
        }
        const float lo = apply_weight(half_to_f32<BF16>(s & 0xFFFFu), w, has_w);
        const float hi = apply_weight(half_to_f32<BF16>(s >> 16), w, has_w);
        if (accumulate) {
            cas_add_x2<BF16>(out, lo, hi);
        } else {
            *out = f32_to_half<BF16>(lo) | (f32_to_half<BF16>(hi) << 16);
        }
    }
};

// 16-bit floats, one element per unit. The compare-and-swap fallback works on the aligned 32-bit word
// holding the element (the other half is written back unchanged, atomically).
template <bool BF16>
struct Halfx1 {
    typedef u16 Unit;
    static constexpr bool kPreload = true;
    __device__ __forceinline__ static void apply(u16 s, u16* out, float w, bool has_w,
                                                 bool accumulate) {
        if (accumulate && NativeRed<BF16>::scalar) {
            const u16 a =
                has_w ? (u16)f32_to_half<BF16>(__fmul_rn(w, half_to_f32<BF16>((u32)s))) : s;
            red_add_x1<BF16>(out, a);
            return;
        }
        const float v = apply_weight(half_to_f32<BF16>((u32)s), w, has_w);
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
            if (Op::kPreload) {
                // All loads first, so UNROLL of them are in flight before the first store or atomic.
                U v[UNROLL] = {};
#pragma unroll
                for (int k = 0; k < UNROLL; ++k) {
                    if (in[k] != nullptr) {
                        v[k] = in[k][c];
                    }
                }
#pragma unroll
                for (int k = 0; k < UNROLL; ++k) {
                    if (in[k] != nullptr) {
                        Op::apply(v[k], out[k] + c, w[k], has_w, acc);
                    }
                }
            } else {
#pragma unroll
                for (int k = 0; k < UNROLL; ++k) {
                    if (in[k] != nullptr) {
                        Op::apply(in[k][c], out[k] + c, w[k], has_w, acc);
                    }
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
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v8, Halfx8<true>)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v4, Halfx4<true>)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v2, Halfx2<true>)
SCATTER_ROWS_FLOAT(scatter_rows_bf16_v1, Halfx1<true>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v8, Halfx8<false>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v4, Halfx4<false>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v2, Halfx2<false>)
SCATTER_ROWS_FLOAT(scatter_rows_f16_v1, Halfx1<false>)
