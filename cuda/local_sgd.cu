// Local SGD's outer update (src/local_sgd/outer.rs is the CPU twin, operation for operation). Every
// product and sum is rounded separately (__fmul_rn, __fadd_rn, __fsub_rn; never an FMA), so the
// device result equals the host result bit for bit.
#include "common.cuh"

// out = global - local: the pseudo-gradient.
extern "C" __global__ void lsgd_pseudo_grad(const float* __restrict__ global,
                                            const float* __restrict__ local,
                                            float* __restrict__ out, u64 n) {
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        out[i] = __fsub_rn(global[i], local[i]);
    }
}

// The fused outer step: momentum (has_mom), Nesterov or plain step, global update and the local
// write-back with mixing factor alpha (0: local = global). One pass over five arrays.
extern "C" __global__ void lsgd_outer(const float* __restrict__ delta, float* __restrict__ global,
                                      float* __restrict__ mom, float* __restrict__ local, u64 n,
                                      float lr, float mu, int nesterov, int has_mom,
                                      float alpha) {
    const float beta = __fsub_rn(1.0f, alpha);
    for (u64 i = first_elem(); i < n; i += elem_step()) {
        const float d = delta[i];
        float step = d;
        if (has_mom) {
            const float m = __fadd_rn(__fmul_rn(mu, mom[i]), d);
            mom[i] = m;
            step = nesterov ? __fadd_rn(d, __fmul_rn(mu, m)) : m;
        }
        const float g = __fsub_rn(global[i], __fmul_rn(lr, step));
        global[i] = g;
        local[i] = alpha == 0.0f ? g : __fadd_rn(__fmul_rn(alpha, local[i]), __fmul_rn(beta, g));
    }
}
