// Scale-and-add: y = a * x + y (f32). The product and the sum are rounded separately (__fmul_rn,
// __fadd_rn; never an FMA), exactly like the CPU twin's `a * x + y`.
#include "common.cuh"

__device__ __forceinline__ float axpy1(float a, float x, float y) {
    return __fadd_rn(__fmul_rn(a, x), y);
}

// Both pointers 16-byte aligned: float4 units, then the (n % 4) tail.
extern "C" __global__ void axpy_f32_v4(float a, const float* __restrict__ x, float* __restrict__ y,
                                       u64 n) {
    const u64 n4 = n / 4;
    const float4* x4 = (const float4*)x;
    float4* y4 = (float4*)y;
    for (u64 i = first_elem(); i < n4; i += elem_step()) {
        const float4 xv = x4[i];
        float4 yv = y4[i];
        yv.x = axpy1(a, xv.x, yv.x);
        yv.y = axpy1(a, xv.y, yv.y);
        yv.z = axpy1(a, xv.z, yv.z);
        yv.w = axpy1(a, xv.w, yv.w);
        y4[i] = yv;
    }
    for (u64 i = n4 * 4 + first_elem(); i < n; i += elem_step()) {
        y[i] = axpy1(a, x[i], y[i]);
    }
}

extern "C" __global__ void axpy_f32_v1(float a, const float* __restrict__ x, float* __restrict__ y,
                                       u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        y[i] = axpy1(a, x[i], y[i]);
    }
}
