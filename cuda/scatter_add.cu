// Sparse-to-dense scatter-add: dense[idx[i]] += val[i] (f32, atomicAdd; duplicate indices allowed, their
// summation order is unspecified). Used by Deep Gradient Compression to densify all-gathered
// (index, value) pairs. 1-D grid-stride loop, four pairs per thread per iteration.
#include "common.cuh"

#define UNROLL 4

extern "C" __global__ void scatter_add_f32(const u32* __restrict__ idx, const float* __restrict__ val,
                                           float* dense, u64 n, u64 n_dense, u32* err) {
    const u64 step = elem_step();
    for (u64 i0 = first_elem(); i0 < n; i0 += step * UNROLL) {
        u32 j[UNROLL];
        float v[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u64 i = i0 + (u64)k * step;
            j[k] = 0xFFFFFFFFu;
            v[k] = 0.0f;
            if (i < n) {
                j[k] = idx[i];
                v[k] = val[i];
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u64 i = i0 + (u64)k * step;
            if (i < n) {
                if ((u64)j[k] < n_dense) {
                    atomicAdd(dense + j[k], v[k]);
                } else {
                    report_bad_index(err, FERRO_ERR_SCATTER_ADD, j[k]);
                }
            }
        }
    }
}
