// Casts between f32 and the 16-bit float formats, round to nearest even (bit-identical to the `half`
// crate's conversions, NaNs and subnormals included). 1-D grid-stride loops.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, u16* __restrict__ y, u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        y[i] = (u16)f32_to_bf16_bits(x[i]);
    }
}

extern "C" __global__ void cast_bf16_to_f32(const u16* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        y[i] = bf16_bits_to_f32((u32)x[i]);
    }
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        y[i] = (u16)f32_to_f16_bits(x[i]);
    }
}

extern "C" __global__ void cast_f16_to_f32(const u16* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        y[i] = f16_bits_to_f32((u32)x[i]);
    }
}
