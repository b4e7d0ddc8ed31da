// Shared helpers for ferroccl's kernels. Embedded by src/kernels/cuda.rs and handed to NVRTC as the
// header "common.cuh" (no CUDA headers are needed: bf16/f16 conversions are done with bit operations,
// mirroring the `half` crate's software conversions bit for bit, so the CPU twin can be compared exactly).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Error flag layout (two u32 words in device memory): word 0 is 0 while no error occurred, else the code
// of the first kernel family that saw an out-of-range index; word 1 is that index.
#define FERRO_ERR_GATHER 1u
#define FERRO_ERR_SCATTER 2u
#define FERRO_ERR_SCATTER_ADD 3u

__device__ __forceinline__ void report_bad_index(u32* err, u32 code, u32 index) {
    if (atomicCAS(err, 0u, code) == 0u) {
        err[1] = index;
    }
}

// bfloat16 -> f32 (exact; NaNs get their quiet bit set, as half::bf16::to_f32).
__device__ __forceinline__ float bf16_bits_to_f32(u32 h) {
    h &= 0xFFFFu;
    if ((h & 0x7FFFu) > 0x7F80u) {
        return __uint_as_float((h | 0x0040u) << 16);
    }
    return __uint_as_float(h << 16);
}

// f32 -> bfloat16, round to nearest even (as half::bf16::from_f32).
__device__ __forceinline__ u32 f32_to_bf16_bits(float value) {
    const u32 x = __float_as_uint(value);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
        return ((x >> 16) | 0x0040u) & 0xFFFFu;
    }
    const u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return ((x >> 16) + 1u) & 0xFFFFu;
    }
    return (x >> 16) & 0xFFFFu;
}

// IEEE binary16 -> f32 (exact, as half::f16::to_f32).
__device__ __forceinline__ float f16_bits_to_f32(u32 i) {
    i &= 0xFFFFu;
    if ((i & 0x7FFFu) == 0u) {
        return __uint_as_float(i << 16);
    }
    const u32 half_sign = i & 0x8000u;
    const u32 half_exp = i & 0x7C00u;
    const u32 half_man = i & 0x03FFu;
    if (half_exp == 0x7C00u) {
        if (half_man == 0u) {
            return __uint_as_float((half_sign << 16) | 0x7F800000u);
        }
        return __uint_as_float((half_sign << 16) | 0x7FC00000u | (half_man << 13));
    }
    const u32 sign = half_sign << 16;
    if (half_exp == 0u) {
        // Subnormal: normalise. leading_zeros_u16(half_man) - 6.
        const u32 e = (u32)__clz((int)half_man) - 16u - 6u;
        const u32 exp = (127u - 15u - e) << 23;
        const u32 man = (half_man << (14u + e)) & 0x007FFFFFu;
        return __uint_as_float(sign | exp | man);
    }
    const int unbiased_exp = (int)(half_exp >> 10) - 15;
    const u32 exp = (u32)(unbiased_exp + 127) << 23;
    const u32 man = (half_man & 0x03FFu) << 13;
    return __uint_as_float(sign | exp | man);
}

// f32 -> IEEE binary16, round to nearest even (as half::f16::from_f32).
__device__ __forceinline__ u32 f32_to_f16_bits(float value) {
    const u32 x = __float_as_uint(value);
    const u32 sign = x & 0x80000000u;
    const u32 exp = x & 0x7F800000u;
    const u32 man = x & 0x007FFFFFu;
    if (exp == 0x7F800000u) {
        const u32 nan_bit = man == 0u ? 0u : 0x0200u;
        return ((sign >> 16) | 0x7C00u | nan_bit | (man >> 13)) & 0xFFFFu;
    }
    const u32 half_sign = sign >> 16;
    const int unbiased_exp = (int)(exp >> 23) - 127;
    const int half_exp = unbiased_exp + 15;
    if (half_exp >= 0x1F) {
        return (half_sign | 0x7C00u) & 0xFFFFu;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return half_sign & 0xFFFFu;
        }
        const u32 m = man | 0x00800000u;
        u32 half_man = m >> (u32)(14 - half_exp);
        const u32 round_bit = 1u << (u32)(13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man += 1u;
        }
        return (half_sign | half_man) & 0xFFFFu;
    }
    const u32 he = (u32)half_exp << 10;
    const u32 hm = man >> 13;
    const u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return ((half_sign | he | hm) + 1u) & 0xFFFFu;
    }
    return (half_sign | he | hm) & 0xFFFFu;
}

// A 16-bit float format, selected at compile time.
template <bool BF16>
__device__ __forceinline__ float half_to_f32(u32 bits) {
    return BF16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}
template <bool BF16>
__device__ __forceinline__ u32 f32_to_half(float v) {
    return BF16 ? f32_to_bf16_bits(v) : f32_to_f16_bits(v);
}

// Rows are distributed over the y dimension of the block (and the grid's x), columns over x.
__device__ __forceinline__ u64 first_row() {
    return (u64)blockIdx.x * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ u64 row_step() {
    return (u64)gridDim.x * blockDim.y;
}
__device__ __forceinline__ u64 first_elem() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ u64 elem_step() {
    return (u64)gridDim.x * blockDim.x;
}
