// Gather rows by index ("pack"): dst[r, :] = src[idx[r], :].
//
// Rows are moved as raw bytes in units of V (uint4 = 16 bytes when the row size and both pointers
// allow it, down to single bytes). Launch with a 2-D block: x over the units of a row, y over rows;
// the grid strides over rows, UNROLL rows per thread per iteration so several loads are in flight.
#include "common.cuh"

#define UNROLL 4

template <typename V>
__device__ __forceinline__ void gather_rows_impl(const V* __restrict__ src, const u32* __restrict__ idx,
                                                 V* __restrict__ dst, u64 n_rows_out, u64 n_rows_src,
                                                 u64 units_per_row, u32* err) {
    const u64 step = row_step();
    for (u64 r0 = first_row(); r0 < n_rows_out; r0 += step * UNROLL) {
        const V* in[UNROLL];
        V* out[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u64 r = r0 + (u64)k * step;
            in[k] = nullptr;
            out[k] = nullptr;
            if (r < n_rows_out) {
                const u32 s = idx[r];
                if ((u64)s < n_rows_src) {
                    in[k] = src + (u64)s * units_per_row;
                    out[k] = dst + r * units_per_row;
                } else if (threadIdx.x == 0) {
                    report_bad_index(err, FERRO_ERR_GATHER, s);
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

#define GATHER_ROWS(NAME, V)                                                                           \
    extern "C" __global__ void NAME(const V* src, const u32* idx, V* dst, u64 n_rows_out,             \
                                    u64 n_rows_src, u64 units_per_row, u32* err) {                    \
        gather_rows_impl<V>(src, idx, dst, n_rows_out, n_rows_src, units_per_row, err);               \
    }

GATHER_ROWS(gather_rows_v16, uint4)
GATHER_ROWS(gather_rows_v8, uint2)
GATHER_ROWS(gather_rows_v4, u32)
GATHER_ROWS(gather_rows_v2, u16)
GATHER_ROWS(gather_rows_v1, u8)
