// Deep Gradient Compression kernels (Lin et al., ICLR 2018). Self-contained (no headers) so NVRTC can
// compile it alone. Every kernel has a CPU twin in src/dgc/select.rs with the same semantics; arithmetic
// is never fused (__fmul_rn/__fadd_rn), so u, v and the candidate *sets* are bit-identical to the twin's.
// Only the order of compacted candidates differs (warp-aggregated atomics); the host sorts them.
//
//   dgc_check_norm   finiteness check + sum of g^2 (f64) + clip scale, in one read of g
//                                                          twins: first_non_finite, sum_squares, clip_scale
//   dgc_sample       |v'| at hashed sample indices, v' the would-be accumulator twin: sample_magnitudes
//   dgc_radix_round  one of three rounds of a multi-block radix select (11+11+10 bits) of the rank-th
//                    largest magnitude            twins: kth_largest, truncated_kth (two rounds)
//   dgc_sample_select  dgc_sample + its radix rounds in one launch (values kept in registers)
//   dgc_topk_select  the speculative top k (radix rounds + dgc_filter with masking) in one launch,
//                    then the control words written to page-locked host memory
//   dgc_fused        clip-scale + momentum + accumulate + threshold + compact  twin: fused_update_select
//   dgc_select       threshold + compact only (threshold correction)           twin: select_above
//   dgc_filter       keep the top k of the candidates: every one above the k-th largest magnitude, and
//                    of those equal to it the lowest indices (optionally masking them)
//                                                         twins: finish_selection (+ mask_sent)
//   dgc_tie_round    one of three rounds of the radix select of the tie indices that dgc_filter keeps
//                    when more candidates equal the k-th than the top k has room for
//   dgc_mask         remove sent values from v, zero u (momentum masking)      twin: mask_sent
//   dgc_decode_sorted  rank-ordered sum of gathered sorted messages / world    twin: wire::decode_average
//   dgc_scatter_add_fixed  decode gathered fixed-k messages, dense += v (atomics, unordered)
//
// Control words (u32 ctl[CTL_LEN], one buffer so that one read-back returns them all):
#define CTL_COUNT 0   // candidates counted by dgc_fused / dgc_select
#define CTL_THR 1     // radix-select result on the sample (float bits): the estimated threshold
#define CTL_SCALE 2   // clip scale (float bits), written by dgc_check_norm
#define CTL_BAD 3     // 0xFFFFFFFF - (first non-finite index), 0: none (atomicMax = first index)
#define CTL_OVF 4     // 1: the squared norm overflowed
#define CTL_SEL 5     // pairs kept by dgc_filter above CTL_KTH (slots 0, 1, ...)
#define CTL_DONE 6    // radix-round ticket (last block finishes the round)
#define CTL_PREFIX 7  // radix select: bits fixed so far
#define CTL_WANT 8    // radix select: rank still wanted among the matching values
#define CTL_KTH 9     // radix-select result on the candidates (float bits)
#define CTL_NDONE 10  // norm ticket
#define CTL_BADACC 11 // dgc_check_norm's atomicMax of CTL_BAD while it runs (published to CTL_BAD)
#define CTL_END 13    // dgc_topk_select's end ticket (the last block publishes the words to the host)
#define CTL_STUCK 14  // 1: a one-launch select gave up waiting for its blocks (see coop_round)
#define CTL_TIES 15   // pairs kept by dgc_filter equal to CTL_KTH (slots rank - CTL_KEEP, ...)
#define CTL_KEEP 16   // the top k's select: how many candidates equal to CTL_KTH the top k keeps
                      // (its rank minus the candidates above CTL_KTH), >= 1
#define CTL_EQ 17     // the top k's select: how many candidates equal CTL_KTH (>= CTL_KEEP)
#define CTL_TIE_LAST 18 // when CTL_EQ > CTL_KEEP: the highest index among the CTL_KEEP lowest
                      // indices of the candidates equal to CTL_KTH (the ties kept)
#define CTL_SEQ 19    // in the host copy only: the step's sequence number, written last
#define RADIX_BINS 2048u
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

// Samples come in runs of SAMPLE_RUN consecutive indices starting at a hashed, run-aligned position:
// one 32-byte sector per run and array instead of one per sample (independent random gathers made
// dgc_sample ~20 us at 1% of 25.5 M).
// Sample j is element j % SAMPLE_RUN of run j / SAMPLE_RUN (wrapping at n); twin: sample_index.
#define SAMPLE_RUN 8ULL
__device__ __forceinline__ u64 run_start(u64 seed, u64 step, u64 run, u64 n) {
    return (mix64(seed ^ mix64((step * 0xd1b54a32d192ed03ULL) ^ run)) % n) & ~(SAMPLE_RUN - 1ULL);
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
// warp with at least one candidate; the pairs go to slots off + *count, off + *count + 1, ... Slots
// at or beyond cap are counted but not stored. Returns true on the lanes whose pair was stored.
__device__ __forceinline__ bool warp_compact_at(bool pred, u32 i, float v, u32 off, u32 cap,
                                                u32* out_idx, float* out_val, u32* count) {
    const u32 ballot = __ballot_sync(FULL_MASK, pred);
    if (ballot == 0u) {
        return false;
    }
    const u32 lane = threadIdx.x & 31u;
    const u32 leader = __ffs(ballot) - 1u;
    u32 base = 0;
    if (lane == leader) {
        base = atomicAdd(count, (u32)__popc(ballot));
    }
    base = __shfl_sync(FULL_MASK, base, leader);
    if (pred) {
        const u32 slot = off + base + (u32)__popc(ballot & ((1u << lane) - 1u));
        if (slot < cap) {
            out_idx[slot] = i;
            out_val[slot] = v;
            return true;
        }
    }
    return false;
}

__device__ __forceinline__ bool warp_compact(bool pred, u32 i, float v, u32 cap, u32* out_idx,
                                             float* out_val, u32* count) {
    return warp_compact_at(pred, i, v, 0u, cap, out_idx, out_val, count);
}

// Programmatic dependent launch (sm_90+; no-ops below, and when the launch did not ask for it): a
// kernel launched with programmatic stream serialization may start while the one before it runs,
// once every block of that one has called pdl_launch_dependents (or exited); pdl_wait() then blocks
// until the one before has completed and its writes are visible. Everything before pdl_wait() may
// only read what the previous step left (g, u, v), never ctl.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ bool state_is_bad(const u32* ctl) {
    return (ctl[CTL_BAD] | ctl[CTL_OVF]) != 0u;
}

// The speculative top k (dgc_compress on the device without waiting for the count) runs only when the
// fused pass's count needs no threshold correction: min_ok <= count <= cap (or the threshold is 0),
// the same test as the host's.
__device__ __forceinline__ bool in_band(const u32* ctl, u32 min_ok, u32 cap) {
    const u32 c = ctl[CTL_COUNT];
    return !state_is_bad(ctl) && c <= cap && (c >= min_ok || __uint_as_float(ctl[CTL_THR]) == 0.0f);
}

__device__ __forceinline__ void check_one(float x, u64 i, double* acc, u64* bad) {
    const double d = (double)x;
    *acc += d * d;
    if (!isfinite(x) && i < *bad) {
        *bad = i;
    }
}

// One read of g: the first non-finite index (CTL_BAD), sum of squares in f64 (*sumsq), and, by the
// last block to finish, the clip scale min(1, limit / sqrt(sumsq)) (CTL_SCALE; 1 when limit <= 0,
// i.e. no clipping) and the overflow flag (CTL_OVF). *sumsq, CTL_BADACC and the tickets must be
// zero on entry. The last block also zeroes the counters of the kernels after it in a compression
// step (CTL_COUNT, CTL_SEL, CTL_TIES, CTL_KTH, CTL_EQ), so a step needs no memset; with self_clean
// it leaves *sumsq and CTL_BADACC zero for the next call too (*sumsq then reads 0 afterwards).
extern "C" __global__ void dgc_check_norm(const float* __restrict__ g, u64 n, double limit, double* sumsq,
                                          u32* ctl, int self_clean) {
    __shared__ double part[32];
    // The sample select may start now: its blocks gather while this pass's last blocks stream g.
    pdl_launch_dependents();
    double acc = 0.0;
    u64 bad = ~0ULL;
    const u64 nvec = n / 4u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    // Four 16-byte loads in flight per thread before any is used: with two, this pass read g at
    // ~2.5 TB/s on an H200 (benches/RESULTS.md).
    for (u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x; q < nvec; q += 4u * stride) {
        float4 x[4];
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) {
            const u64 qj = q + j * stride;
            x[j] = qj < nvec ? g4[qj] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (u32 j = 0; j < 4u; ++j) {
            const u64 qj = q + j * stride;
            check_one(x[j].x, 4u * qj, &acc, &bad);
            check_one(x[j].y, 4u * qj + 1u, &acc, &bad);
            check_one(x[j].z, 4u * qj + 2u, &acc, &bad);
            check_one(x[j].w, 4u * qj + 3u, &acc, &bad);
        }
    }
    if (blockIdx.x == 0u && threadIdx.x < 4u) {
        const u64 i = nvec * 4u + threadIdx.x;
        if (i < n) {
            check_one(g[i], i, &acc, &bad);
        }
    }
    if (bad != ~0ULL) {
        atomicMax(ctl + CTL_BADACC, 0xFFFFFFFFu - (u32)bad);
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
            atomicAdd(sumsq, acc);
            __threadfence();
            const u32 ticket = atomicAdd(ctl + CTL_NDONE, 1u);
            if (ticket == gridDim.x - 1u) {
                unsigned long long* sq = reinterpret_cast<unsigned long long*>(sumsq);
                const double total =
                    __longlong_as_double((long long)(self_clean ? atomicExch(sq, 0ULL) : atomicAdd(sq, 0ULL)));
                ctl[CTL_BAD] = self_clean ? atomicExch(ctl + CTL_BADACC, 0u) : atomicAdd(ctl + CTL_BADACC, 0u);
                ctl[CTL_COUNT] = 0u;
                ctl[CTL_SEL] = 0u;
                ctl[CTL_TIES] = 0u;
                ctl[CTL_KTH] = 0u;
                ctl[CTL_EQ] = 0u;
                float scale = 1.0f;
                ctl[CTL_OVF] = (!isfinite(total) && limit > 0.0) ? 1u : 0u;
                if (isfinite(total) && limit > 0.0) {
                    const double norm = sqrt(total);
                    if (norm > limit && norm > 0.0) {
                        scale = (float)(limit / norm);
                    }
                }
                ctl[CTL_SCALE] = __float_as_uint(scale);
                ctl[CTL_NDONE] = 0u;
            }
        }
    }
}

__device__ __forceinline__ float load_scale(float scale, int scale_from_ctl, const u32* ctl) {
    return scale_from_ctl ? __uint_as_float(ctl[CTL_SCALE]) : scale;
}

// Over the 32 lanes of a warp, each holding the count `mine` of its (consecutive, higher lanes =
// larger values) bins: the highest lane whose suffix sum (its own and every higher lane's count)
// is >= want, and what is still wanted within that lane's bins. When no lane reaches want: lane 0.
__device__ __forceinline__ void suffix_pick(u32 mine, u32 want, u32* top, u32* rest) {
    const u32 lane = threadIdx.x & 31u;
    u32 suffix = mine;
    for (int o = 1; o < 32; o <<= 1) {
        const u32 t = __shfl_down_sync(FULL_MASK, suffix, o);
        if (lane + (u32)o < 32u) {
            suffix += t;
        }
    }
    const u32 ok = __ballot_sync(FULL_MASK, suffix >= want);
    const u32 t = ok == 0u ? 0u : 31u - (u32)__clz(ok);
    const u32 above = __shfl_sync(FULL_MASK, suffix - mine, t);
    *top = t;
    *rest = ok == 0u ? want : want - above;
}

// One radix round's choice, by the first warp (all 32 lanes call it; every lane gets the result):
// the bin of hist[0..nbins) (nbins = 1024 or 2048; higher bins = larger values) that holds the
// want-th largest counted value; returns prefix | bin << shift and the rank still wanted inside it.
__device__ __forceinline__ void radix_pick(const u32* hist, u32 nbins, int shift, u32 prefix, u32 want,
                                           u32* out_prefix, u32* out_want) {
    const u32 lane = threadIdx.x & 31u;
    const u32 per = nbins / 32u;  // 64 or 32 bins per lane, a power of two
    // Lane `lane` owns bins [lane*per, lane*per + per), summed in a rotated order so that the 32
    // lanes read 32 different banks.
    u32 mine = 0u;
#pragma unroll 8
    for (u32 b = 0; b < per; ++b) {
        mine += hist[lane * per + ((b + lane) & (per - 1u))];
    }
    u32 top, w;
    suffix_pick(mine, want, &top, &w);
    // Within lane top's bins: q = per / 32 consecutive bins per lane, the same pick again.
    const u32 q = per / 32u;
    const u32 base = top * per + lane * q;
    u32 m2 = 0u;
    for (u32 b = 0; b < q; ++b) {
        m2 += hist[base + b];
    }
    u32 top2, w2;
    suffix_pick(m2, w, &top2, &w2);
    u32 bin = base;
    if (lane == top2) {
        for (int b = (int)q - 1; b >= 0; --b) {
            const u32 h = hist[base + (u32)b];
            if (h >= w2) {
                bin = base + (u32)b;
                break;
            }
            w2 -= h;
        }
    }
    bin = __shfl_sync(FULL_MASK, bin, top2);
    *out_want = __shfl_sync(FULL_MASK, w2, top2);
    *out_prefix = prefix | (bin << shift);
}

// The bit layout of radix round `round`: shift, bins, and the mask of the bits fixed before it.
__device__ __forceinline__ void radix_layout(int round, int* shift, u32* nbins, u32* hi_mask) {
    *shift = round == 0 ? 21 : (round == 1 ? 10 : 0);
    *nbins = round == 2 ? 1024u : 2048u;
    *hi_mask = round == 0 ? 0u : (0xFFFFFFFFu << (*shift + (round == 1 ? 11 : 10)));
}

// Every block adds its shared `hist` (nbins words) to ghist (zero on entry); then one ticket per
// block: returns true, on every thread, in the last block to finish.
__device__ __forceinline__ bool radix_merge(const u32* hist, u32* last_s, u32 nbins, u32* ctl, u32* ghist) {
    __syncthreads();
    for (u32 b = threadIdx.x; b < nbins; b += blockDim.x) {
        const u32 h = hist[b];
        if (h != 0u) {
            atomicAdd(ghist + b, h);
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0u) {
        *last_s = atomicAdd(ctl + CTL_DONE, 1u) == gridDim.x - 1u ? 1u : 0u;
    }
    __syncthreads();
    return *last_s != 0u;
}

// The last block of a round: gather the global histogram into `hist` (clearing ghist for the next
// round or call), pick the bin (radix_pick) and write CTL_PREFIX/CTL_WANT, and the result plus
// `add` to ctl[out_slot] when `last` (add: the base of offset keys, see topk_body); reset the
// ticket. Thread 0 writes the control words. The top k's select (out_slot CTL_KTH, exact: the last
// round's bins are single values) also writes, with its result, CTL_KEEP = the rank still wanted
// among the values equal to it (its rank minus the values above it) and CTL_EQ = how many there are.
__device__ __forceinline__ void radix_gather_pick(u32* hist, u32 nbins, int shift, u32 prefix, u32 want,
                                                  bool last, u32 add, int out_slot, u32* ctl,
                                                  u32* ghist) {
    // Plain L2 loads, eight in flight per thread before any is used: one atomicExch per bin, each
    // waited on before the next, made this ~8 us of every round.
    __threadfence();
    for (u32 b0 = threadIdx.x; b0 < nbins; b0 += 8u * blockDim.x) {
        u32 r[8];
#pragma unroll
        for (u32 t = 0; t < 8u; ++t) {
            const u32 b = b0 + t * blockDim.x;
            r[t] = b < nbins ? __ldcg(ghist + b) : 0u;
        }
#pragma unroll
        for (u32 t = 0; t < 8u; ++t) {
            const u32 b = b0 + t * blockDim.x;
            if (b < nbins) {
                hist[b] = r[t];
                ghist[b] = 0u;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < 32u) {
        u32 p, w;
        radix_pick(hist, nbins, shift, prefix, want, &p, &w);
        if (threadIdx.x == 0u) {
            ctl[CTL_PREFIX] = p;
            ctl[CTL_WANT] = w;
            if (last) {
                ctl[out_slot] = p + add;
                if (out_slot == CTL_KTH) {
                    ctl[CTL_KEEP] = w;
                    ctl[CTL_EQ] = hist[(p >> shift) & (nbins - 1u)];
                }
            }
            ctl[CTL_DONE] = 0u;
        }
    }
}

// The end of a multi-block radix round, after every block has histogrammed its values into its shared
// `hist`: radix_merge, then the last block to finish runs radix_gather_pick. Every thread of every
// block calls it.
__device__ __forceinline__ void radix_finish(u32* hist, u32* last_s, u32 nbins, int shift, u32 prefix,
                                             u32 want, bool last, int out_slot, u32* ctl, u32* ghist) {
    if (radix_merge(hist, last_s, nbins, ctl, ghist)) {
        radix_gather_pick(hist, nbins, shift, prefix, want, last, 0u, out_slot, ctl, ghist);
    }
}

// One-launch selects (dgc_sample_select, dgc_topk_select): the grid is co-resident (a cooperative
// launch guarantees it), every thread holds up to COOP_PER values in registers, and the rounds of the
// radix select are separated by a grid-wide wait instead of kernel launches. A round costs one
// histogram merge and one wait (~3 us) instead of a launch (~7 us of kernel time each, plus the gap).
#define COOP_PER 16
#define CTL_GEN 12    // rounds completed by one-launch selects: never reset, waited on relative to
                      // its value at entry (read before the block's first ticket, so before any bump)

// One round over the register-held keys (valid: bit t of `valid`), on every thread of every
// block: the keys matching *prefix on hi_mask are histogrammed on bits [shift, shift + log2 nbins),
// merged, the last block picks (writing key + add to ctl[out_slot] when `last`) and bumps CTL_GEN,
// the others wait for it (when `wait`) until the one-launch select's `nth` round is done. Updates
// *prefix and *want on every thread (when `wait` or in the last block).
__device__ __forceinline__ void coop_round(const u32* bits, u32 valid, int shift, u32 nbins, u32 hi_mask,
                                           bool last, u32 add, int out_slot, bool wait, u32 nth,
                                           u32* hist, u32* sh, u32 gen0, u32* prefix, u32* want,
                                           u32* ctl, u32* ghist) {
    for (u32 b = threadIdx.x; b < nbins; b += blockDim.x) {
        hist[b] = 0u;
    }
    __syncthreads();
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        if (((valid >> t) & 1u) != 0u && ((bits[t] ^ *prefix) & hi_mask) == 0u) {
            atomicAdd(&hist[(bits[t] >> shift) & (nbins - 1u)], 1u);
        }
    }
    if (radix_merge(hist, sh, nbins, ctl, ghist)) {
        radix_gather_pick(hist, nbins, shift, *prefix, *want, last, add, out_slot, ctl, ghist);
        if (threadIdx.x == 0u) {
            __threadfence();
            atomicAdd(ctl + CTL_GEN, 1u);
        }
    } else if (wait && threadIdx.x == 0u) {
        // Every block is resident (cooperative launch, or a grid sized by the occupancy query);
        // should one not be (a partitioned GPU), give up after ~4 s and flag CTL_STUCK rather
        // than hang: the host then reports an error and uses one launch per round.
        const volatile u32* gen = ctl + CTL_GEN;
        u64 t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        while (*gen - gen0 < nth) {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (t - t0 > 4000000000ULL) {
                atomicExch(ctl + CTL_STUCK, 1u);
                break;
            }
        }
        __threadfence();
    }
    __syncthreads();
    *prefix = __ldcg(ctl + CTL_PREFIX);
    *want = __ldcg(ctl + CTL_WANT);
}

// The radix rounds 0..last_round of radix_layout (the bits themselves, from *prefix = 0 and
// *want = the rank) as rounds nth0, nth0 + 1, ... of a one-launch select; every round but the
// last waits for the pick, the last only when `wait_last`. Result in ctl[out_slot].
__device__ __forceinline__ void coop_radix(const u32* bits, u32 valid, int last_round, int out_slot,
                                           bool wait_last, u32 nth0, u32* hist, u32* sh, u32 gen0,
                                           u32* prefix, u32* want, u32* ctl, u32* ghist) {
    for (int round = 0; round <= last_round; ++round) {
        int shift;
        u32 nbins, hi_mask;
        radix_layout(round, &shift, &nbins, &hi_mask);
        coop_round(bits, valid, shift, nbins, hi_mask, round == last_round, 0u, out_slot,
                   round < last_round || wait_last, nth0 + (u32)round, hist, sh, gen0, prefix, want,
                   ctl, ghist);
    }
}

// dgc_sample and the radix rounds (dgc_radix_round, rounds 0..last_round) in one cooperative launch:
// the sampled |v'| stay in registers. Needs gridDim.x * blockDim.x * COOP_PER >= s rounded up to
// whole runs, and g, u, v 16-byte aligned. Result in ctl[out_slot].
extern "C" __global__ void dgc_sample_select(const float* __restrict__ g, const float* __restrict__ u,
                                             const float* __restrict__ v, u64 n, float scale,
                                             int scale_from_ctl, float m, int mc, u64 seed, u64 step,
                                             u64 s, int exact, u32 rank, int last_round, int out_slot,
                                             u32* ctl, u32* ghist) {
    __shared__ u32 hist[RADIX_BINS];
    __shared__ u32 sh[2];
    if (threadIdx.x == 0u) {
        sh[1] = __ldcg(ctl + CTL_GEN);
    }
    pdl_launch_dependents();
    // Each thread gathers whole runs (COOP_PER / SAMPLE_RUN of them): one hash per run, two 16-byte
    // loads per run and array (runs start 8-aligned); a run that wraps at n is read element-wise.
    const u64 nruns = (s + SAMPLE_RUN - 1u) / SAMPLE_RUN;
    const u64 rstride = (u64)gridDim.x * blockDim.x;
    const u64 r0 = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    float gg[COOP_PER], uu[COOP_PER], vv[COOP_PER];
    u32 valid = 0u;
#pragma unroll
    for (u32 h = 0; h < COOP_PER / SAMPLE_RUN; ++h) {
        const u64 run = r0 + h * rstride;
        const u32 t0 = h * (u32)SAMPLE_RUN;
#pragma unroll
        for (u32 e = 0; e < SAMPLE_RUN; ++e) {
            gg[t0 + e] = 0.0f;
            uu[t0 + e] = 0.0f;
            vv[t0 + e] = 0.0f;
        }
        if (run < nruns) {
            const u64 start = exact ? run * SAMPLE_RUN : run_start(seed, step, run, n);
            if (start + SAMPLE_RUN <= n) {
                const float4* g4 = reinterpret_cast<const float4*>(g + start);
                const float4* u4 = reinterpret_cast<const float4*>(u + start);
                const float4* v4 = reinterpret_cast<const float4*>(v + start);
#pragma unroll
                for (u32 q = 0; q < 2u; ++q) {
                    const float4 a = g4[q], b = u4[q], c = v4[q];
                    gg[t0 + 4u * q] = a.x, gg[t0 + 4u * q + 1u] = a.y, gg[t0 + 4u * q + 2u] = a.z;
                    gg[t0 + 4u * q + 3u] = a.w;
                    uu[t0 + 4u * q] = b.x, uu[t0 + 4u * q + 1u] = b.y, uu[t0 + 4u * q + 2u] = b.z;
                    uu[t0 + 4u * q + 3u] = b.w;
                    vv[t0 + 4u * q] = c.x, vv[t0 + 4u * q + 1u] = c.y, vv[t0 + 4u * q + 2u] = c.z;
                    vv[t0 + 4u * q + 3u] = c.w;
                }
            } else {
#pragma unroll
                for (u32 e = 0; e < SAMPLE_RUN; ++e) {
                    const u64 i = (start + e) % n;
                    gg[t0 + e] = g[i];
                    uu[t0 + e] = u[i];
                    vv[t0 + e] = v[i];
                }
            }
#pragma unroll
            for (u32 e = 0; e < SAMPLE_RUN; ++e) {
                valid |= (run * SAMPLE_RUN + e < s ? 1u : 0u) << (t0 + e);
            }
        }
    }
    // The clip scale comes from dgc_check_norm.
    pdl_wait();
    const float sc = load_scale(scale, scale_from_ctl, ctl);
    u32 bits[COOP_PER];
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        float u2;
        bits[t] = __float_as_uint(fabsf(dgc_apply(gg[t], uu[t], vv[t], sc, m, mc, &u2)));
    }
    __syncthreads();
    const u32 gen0 = sh[1];
    u32 prefix = 0u, want = rank;
    coop_radix(bits, valid, last_round, out_slot, false, 1u, hist, sh, gen0, &prefix, &want, ctl, ghist);
}

// The speculative top k of the candidates in one cooperative launch: the k-th largest (two radix
// rounds over offsets above the threshold, or dgc_radix_round's three; same result) and dgc_filter
// (spec = 1, cut = 1: dgc_tie_round's three rounds run here too when the ties need cutting), the
// candidates held in registers between them. Nothing happens unless the count is in the band; with
// at most `rank` candidates every one is kept (CTL_KTH stays 0). Needs gridDim.x * blockDim.x *
// COOP_PER >= cnt.
__device__ __forceinline__ void topk_body(const u32* __restrict__ idx_in, const float* __restrict__ val_in,
                                          u32 cnt, u32 rank, u32 cap, u32* idx_out, float* val_out,
                                          u32* ctl, u32* ghist, u32 min_ok, u32 band_cap, float* u,
                                          float* v, int mask) {
    __shared__ u32 hist[RADIX_BINS];
    __shared__ u32 sh[2];
    pdl_wait();
    if (!in_band(ctl, min_ok, band_cap)) {
        return;
    }
    cnt = min(cnt, ctl[CTL_COUNT]);
    if (threadIdx.x == 0u) {
        sh[1] = __ldcg(ctl + CTL_GEN);
    }
    const u32 stride = gridDim.x * blockDim.x;
    const u32 j0 = blockIdx.x * blockDim.x + threadIdx.x;
    float x[COOP_PER];
    u32 bits[COOP_PER];
    u32 valid = 0u;
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        const u32 j = j0 + t * stride;
        x[t] = j < cnt ? val_in[j] : 0.0f;
        valid |= (j < cnt ? 1u : 0u) << t;
    }
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        bits[t] = __float_as_uint(fabsf(x[t]));
    }
    __syncthreads();
    const u32 gen0 = sh[1];
    // The k-th largest magnitude (bits; 0: keep every candidate), how many candidates equal to it
    // the top k keeps and how many there are (CTL_KEEP, CTL_EQ), and the one-launch rounds so far.
    u32 kb = 0u, keep = 0u, eq = 0u, nth = 0u;
    if (cnt > rank) {
        // Two rounds instead of three, nearly always: every candidate passed the estimated
        // threshold t (|x| >= t), and the k-th largest nearly always lies less than 2^22 ulps
        // (a half binade, x1.25-1.5) above it, because the count is within the band. So the keys
        // are the offsets bits - bits(t), clamped to 2^22 - 1: round A bins offset >> 11, round B
        // the low 11 bits within A's bin; exact unless A picks the top (clamped) bin, which falls
        // back to the three rounds over the bits themselves.
        const u32 tb = ctl[CTL_THR];
        const u32 top = (1u << 22) - 1u;
#pragma unroll
        for (u32 t = 0; t < COOP_PER; ++t) {
            bits[t] = min(bits[t] - tb, top);  // bits >= tb: dgc_passes(x, t) held
        }
        u32 prefix = 0u, want = rank;
        coop_round(bits, valid, 11, 2048u, 0u, false, 0u, CTL_KTH, true, 1u, hist, sh, gen0, &prefix,
                   &want, ctl, ghist);
        if ((prefix >> 11) != (top >> 11)) {
            coop_round(bits, valid, 0, 2048u, ~2047u, true, tb, CTL_KTH, true, 2u, hist, sh, gen0,
                       &prefix, &want, ctl, ghist);
            prefix += tb;
            nth = 2u;
        } else {
#pragma unroll
            for (u32 t = 0; t < COOP_PER; ++t) {
                bits[t] = __float_as_uint(fabsf(x[t]));
            }
            prefix = 0u;
            want = rank;
            coop_radix(bits, valid, 2, CTL_KTH, true, 2u, hist, sh, gen0, &prefix, &want, ctl, ghist);
            nth = 4u;
        }
        kb = prefix;
        keep = want;
        eq = __ldcg(ctl + CTL_EQ);  // written with CTL_WANT by the last round's pick
    }
    // The top k: every candidate above the k-th (gt, rank - keep of them) and `keep` of those equal
    // to it (eqs). Float compares of |x| order exactly as the rounds' bits did (candidates are
    // never NaN, dgc_passes rejects it, and nothing here flushes subnormals); compared as bits,
    // the compiler kept the rounds' |x| bits live instead (sm_90: 94 registers instead of 80).
    const float thr = __uint_as_float(kb);
    u32 gt = 0u, eqs = 0u;
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        const bool on = ((valid >> t) & 1u) != 0u;
        gt |= (on && fabsf(x[t]) > thr ? 1u : 0u) << t;
        eqs |= (on && kb != 0u && fabsf(x[t]) == thr ? 1u : 0u) << t;
    }
    // Every load before any store (and before the atomics below, which then overlap them).
    u32 ii[COOP_PER];
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        ii[t] = (((gt | eqs) >> t) & 1u) != 0u ? idx_in[j0 + t * stride] : 0u;
    }
    if (eq > keep) {
        // More ties than room (e.g. gradients of bf16 precision: massive exact ties): keep the
        // `keep` lowest indices among them, the CPU twin's order. Their highest is the
        // (eq - keep + 1)-th largest tie index: dgc_tie_round's three rounds, over the indices
        // held for the filter. Uniform: every thread read the same eq and keep.
        u32 prefix = 0u, want = eq - keep + 1u;
        coop_radix(ii, eqs, 2, CTL_TIE_LAST, true, nth + 1u, hist, sh, gen0, &prefix, &want, ctl,
                   ghist);
#pragma unroll
        for (u32 t = 0; t < COOP_PER; ++t) {
            if (ii[t] > prefix) {
                eqs &= ~(1u << t);
            }
        }
        // The values again (L2 loads; __ldcg, so that the compiler does not keep the first ones):
        // x and the indices both live through these rounds made the kernel 95 registers, not 80
        // (sm_90).
#pragma unroll
        for (u32 t = 0; t < COOP_PER; ++t) {
            x[t] = (((gt | eqs) >> t) & 1u) != 0u ? __ldcg(val_in + j0 + t * stride) : 0.0f;
        }
    }
    // The filter: one atomic per warp and kind (above the k-th: slots from 0, CTL_SEL; ties: slots
    // from rank - keep, CTL_TIES) for all of its lanes' kept values (a warp_compact per value made
    // sixteen dependent atomics and loads per thread). Both counts fit in 16 bits (at most
    // 32 x COOP_PER per warp), so one scan carries both.
    const u32 lane = threadIdx.x & 31u;
    const u32 mine = (u32)__popc(gt) | ((u32)__popc(eqs) << 16);
    u32 incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= (u32)o) {
            incl += y;
        }
    }
    const u32 total = __shfl_sync(FULL_MASK, incl, 31);
    u32 base_gt = 0u, base_eq = 0u;
    if (lane == 31u) {
        if ((total & 0xFFFFu) != 0u) {
            base_gt = atomicAdd(ctl + CTL_SEL, total & 0xFFFFu);
        }
        if ((total >> 16) != 0u) {
            base_eq = atomicAdd(ctl + CTL_TIES, total >> 16);
        }
    }
    const u32 excl = incl - mine;
    u32 slot_gt = __shfl_sync(FULL_MASK, base_gt, 31) + (excl & 0xFFFFu);
    u32 slot_eq = rank - keep + __shfl_sync(FULL_MASK, base_eq, 31) + (excl >> 16);
    const u32 pass = gt | eqs;
    // Kept: passes and lands below cap (slots beyond cap are counted, not stored; with cap >= rank
    // there are none). Masking: the candidates are v's own values (dgc_fused stored them and
    // nothing wrote v since), so mask_sent's v - sent is 0 and v need not be read.
#pragma unroll
    for (u32 t = 0; t < COOP_PER; ++t) {
        if (((pass >> t) & 1u) != 0u) {
            const u32 slot = ((gt >> t) & 1u) != 0u ? slot_gt++ : slot_eq++;
            if (slot < cap) {
                idx_out[slot] = ii[t];
                val_out[slot] = x[t];
                if (mask) {
                    v[ii[t]] = 0.0f;
                    if (mask == 2) {
                        u[ii[t]] = 0.0f;
                    }
                }
            }
        }
    }
}

// The last block to finish copies ctl[0..CTL_SEQ) to `host` (page-locked host memory, written
// through PCIe), then host[CTL_SEQ] = seq: the host waits for that word instead of a device-to-host
// copy and a stream synchronisation.
__device__ __forceinline__ void publish_ctl(u32* ctl, u32* host, u32 seq) {
    __shared__ u32 last;
    __syncthreads();
    if (threadIdx.x == 0u) {
        __threadfence();
        last = atomicAdd(ctl + CTL_END, 1u) == gridDim.x - 1u ? 1u : 0u;
    }
    __syncthreads();
    if (last == 0u) {
        return;
    }
    if (threadIdx.x < CTL_SEQ) {
        host[threadIdx.x] = threadIdx.x == CTL_END ? 0u : __ldcg(ctl + threadIdx.x);
    }
    if (threadIdx.x == 0u) {
        ctl[CTL_END] = 0u;
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0u) {
        *(volatile u32*)(host + CTL_SEQ) = seq;
    }
}

// The speculative top k (topk_body), then the control words to the host (publish_ctl).
extern "C" __global__ void dgc_topk_select(const u32* __restrict__ idx_in, const float* __restrict__ val_in,
                                           u32 cnt, u32 rank, u32 cap, u32* idx_out, float* val_out,
                                           u32* ctl, u32* ghist, u32 min_ok, u32 band_cap, float* u,
                                           float* v, int mask, u32* host, u32 seq) {
    topk_body(idx_in, val_in, cnt, rank, cap, idx_out, val_out, ctl, ghist, min_ok, band_cap, u, v, mask);
    publish_ctl(ctl, host, seq);
}


// exact = 1: every element in order (s = n), for Selection::ExactTopK.
extern "C" __global__ void dgc_sample(const float* __restrict__ g, const float* __restrict__ u,
                                      const float* __restrict__ v, u64 n, float scale, int scale_from_ctl,
                                      float m, int mc, u64 seed, u64 step, u64 s, int exact,
                                      float* out, const u32* ctl) {
    const float sc = load_scale(scale, scale_from_ctl, ctl);
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < s; j += stride) {
        const u64 i = exact ? j : (run_start(seed, step, j / SAMPLE_RUN, n) + j % SAMPLE_RUN) % n;
        float u2;
        out[j] = fabsf(dgc_apply(g[i], u[i], v[i], sc, m, mc, &u2));
    }
}

// Round `round` (0, 1, 2) of the radix select of the rank-th largest magnitude (1-based, 1 <= rank <= s)
// of xs[0..s): 11, 11 and 10 bits of the float pattern (for non-negative floats the bit patterns
// order like the values). Every block histograms the values that match the prefix fixed so far into
// shared memory and adds it to ghist (RADIX_BINS words, zero on entry); the last block to finish
// picks the bin, updates CTL_PREFIX/CTL_WANT, zeroes ghist, and after round last_round writes the
// prefix to ctl[out_slot]: after round 2 the exact value, after round 1 its top 22 bits (the low 10
// cleared: the sampled threshold, twin truncated_kth). Three or two launches, no host sync.
// spec = 1: speculative top k of the candidates: s = min(CTL_COUNT, s), and nothing happens unless the
// count is in the band (min_ok, band_cap) and above rank.
extern "C" __global__ void dgc_radix_round(const float* __restrict__ xs, u32 s, u32 rank, int round,
                                           u32* ctl, u32* ghist, int out_slot, int last_round,
                                           int spec, u32 min_ok, u32 band_cap) {
    __shared__ u32 hist[RADIX_BINS];
    __shared__ u32 last_s;
    if (spec) {
        if (!in_band(ctl, min_ok, band_cap) || ctl[CTL_COUNT] <= rank) {
            return;
        }
        s = min(s, ctl[CTL_COUNT]);
    }
    int shift;
    u32 nbins, hi_mask;
    radix_layout(round, &shift, &nbins, &hi_mask);
    const u32 prefix = round == 0 ? 0u : ctl[CTL_PREFIX];
    for (u32 b = threadIdx.x; b < nbins; b += blockDim.x) {
        hist[b] = 0u;
    }
    __syncthreads();
    // Eight loads in flight per thread before the first atomic (the grid is sized for about eight
    // values per thread): one load at a time left every round waiting on memory latency.
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j0 = (u64)blockIdx.x * blockDim.x + threadIdx.x; j0 < s; j0 += 8u * stride) {
        u32 bits[8];
#pragma unroll
        for (u32 t = 0; t < 8u; ++t) {
            const u64 j = j0 + t * stride;
            bits[t] = j < s ? __float_as_uint(fabsf(xs[j])) : 0u;
        }
#pragma unroll
        for (u32 t = 0; t < 8u; ++t) {
            if (j0 + t * stride < s && ((bits[t] ^ prefix) & hi_mask) == 0u) {
                atomicAdd(&hist[(bits[t] >> shift) & (nbins - 1u)], 1u);
            }
        }
    }
    radix_finish(hist, &last_s, nbins, shift, prefix, round == 0 ? rank : ctl[CTL_WANT],
                 round == last_round, out_slot, ctl, ghist);
}


// The fused pass. Vectorised (float4) over the first n4 = n/4*4 elements, scalar tail. Grid-stride
// loops whose bounds are warp-uniform, so every lane reaches the ballots. With `guard`, does nothing
// when dgc_check_norm flagged a non-finite gradient (so the state is untouched without a host sync).
// The scale comes from CTL_SCALE when scale_from_ctl, the threshold from ctl[thr_slot] when
// thr_slot >= 0; the count goes to CTL_COUNT.
extern "C" __global__ void dgc_fused(const float* __restrict__ g, float* __restrict__ u,
                                     float* __restrict__ v, u64 n, float scale, int scale_from_ctl, float m,
                                     int mc, float thr_in, int thr_slot, int guard, u32 cap, u32* out_idx,
                                     float* out_val, u32* ctl) {
    const u64 nvec = n / 4u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* u4 = reinterpret_cast<float4*>(u);
    float4* v4 = reinterpret_cast<float4*>(v);
    // The first vector is loaded before waiting for the kernel before (launched early, this only
    // overlaps its tail); g, u, v are not written by it.
    const u64 first = (u64)blockIdx.x * blockDim.x;
    float4 g0 = make_float4(0.f, 0.f, 0.f, 0.f), u0 = g0, v0 = g0;
    if (first + threadIdx.x < nvec) {
        g0 = g4[first + threadIdx.x];
        u0 = u4[first + threadIdx.x];
        v0 = v4[first + threadIdx.x];
    }
    pdl_wait();
    if (guard && state_is_bad(ctl)) {
        return;
    }
    const float sc = load_scale(scale, scale_from_ctl, ctl);
    const float thr = thr_slot >= 0 ? __uint_as_float(ctl[thr_slot]) : thr_in;
    u32* count = ctl + CTL_COUNT;
    for (u64 base = first; base < nvec; base += stride) {
        const u64 q = base + threadIdx.x;
        const bool active = q < nvec;
        float4 gv = make_float4(0.f, 0.f, 0.f, 0.f), uv = gv, vv = gv;
        if (active) {
            if (base == first) {
                gv = g0;
                uv = u0;
                vv = v0;
            } else {
                gv = g4[q];
                uv = u4[q];
                vv = v4[q];
            }
            vv.x = dgc_apply(gv.x, uv.x, vv.x, sc, m, mc, &uv.x);
            vv.y = dgc_apply(gv.y, uv.y, vv.y, sc, m, mc, &uv.y);
            vv.z = dgc_apply(gv.z, uv.z, vv.z, sc, m, mc, &uv.z);
            vv.w = dgc_apply(gv.w, uv.w, vv.w, sc, m, mc, &uv.w);
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
    // The top k may launch now (earlier, its blocks would take room this pass needs).
    pdl_launch_dependents();
    // Tail (< 4 elements): block 0, first warp.
    if (blockIdx.x == 0u && threadIdx.x < 32u) {
        const u64 i = nvec * 4u + threadIdx.x;
        const bool active = i < n;
        float vv = 0.0f;
        if (active) {
            float u2;
            vv = dgc_apply(g[i], u[i], v[i], sc, m, mc, &u2);
            u[i] = u2;
            v[i] = vv;
        }
        warp_compact(active && dgc_passes(vv, thr), (u32)i, vv, cap, out_idx, out_val, count);
    }
}

// Threshold + compaction only (read-only on v); the count goes to CTL_COUNT.
extern "C" __global__ void dgc_select(const float* __restrict__ v, u64 n, float thr, u32 cap,
                                      u32* out_idx, float* out_val, u32* ctl) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 base = (u64)blockIdx.x * blockDim.x; base < n; base += stride) {
        const u64 i = base + threadIdx.x;
        const float x = i < n ? v[i] : 0.0f;
        warp_compact(i < n && dgc_passes(x, thr), (u32)i, x, cap, out_idx, out_val, ctl + CTL_COUNT);
    }
}

// spec = 1: cnt = min(CTL_SEL + CTL_TIES, cnt) (what dgc_filter kept), and nothing happens unless
// the count is in the band.
extern "C" __global__ void dgc_mask(float* u, float* v, const u32* __restrict__ idx,
                                    const float* __restrict__ sent, u32 cnt, int mask_momentum, int spec,
                                    u32 min_ok, u32 band_cap, const u32* ctl) {
    if (spec) {
        if (!in_band(ctl, min_ok, band_cap)) {
            return;
        }
        cnt = min(cnt, ctl[CTL_SEL] + ctl[CTL_TIES]);
    }
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

// Keep the top `rank` of the candidates by magnitude, ctl[CTL_KTH] being the rank-th largest
// candidate magnitude (0: at most rank candidates, keep every one): every candidate above it, into
// slots 0, 1, ... (count: CTL_SEL), and CTL_KEEP of those equal to it, into slots rank - CTL_KEEP,
// ... (count: CTL_TIES); nothing is stored at or beyond cap. When more candidates equal it than
// that (CTL_EQ > CTL_KEEP), the ones kept are those with the lowest indices (index <=
// ctl[CTL_TIE_LAST], from dgc_tie_round), the CPU twin's order; with cut = 0 the kernel then does
// nothing at all (the host reads the control words, runs dgc_tie_round and this again with cut =
// 1), with cut = 1 dgc_tie_round ran before. Magnitudes are compared as bits, as the radix rounds
// counted them.
// spec = 1: cnt = min(CTL_COUNT, cnt), and nothing happens unless the count is in the band.
// mask = 1 or 2: also dgc_mask's update for every kept pair (2: zero u too), saving its launch; the
// candidates are v's own values, so that update is v = 0.
extern "C" __global__ void dgc_filter(const u32* __restrict__ idx_in, const float* __restrict__ val_in,
                                      u32 cnt, u32 rank, u32 cap, u32* idx_out, float* val_out, u32* ctl,
                                      int spec, u32 min_ok, u32 band_cap, float* u, float* v, int mask,
                                      int cut) {
    if (spec) {
        if (!in_band(ctl, min_ok, band_cap)) {
            return;
        }
        cnt = min(cnt, ctl[CTL_COUNT]);
    }
    const u32 kb = ctl[CTL_KTH];
    const u32 keep = kb != 0u ? ctl[CTL_KEEP] : 0u;
    const bool over = kb != 0u && ctl[CTL_EQ] > keep;
    if (over && !cut) {
        return;
    }
    const u32 last = over ? ctl[CTL_TIE_LAST] : 0xFFFFFFFFu;
    const u32 eq_base = rank - keep;
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 base = blockIdx.x * blockDim.x; base < cnt; base += stride) {
        const u32 j = base + threadIdx.x;
        const float x = j < cnt ? val_in[j] : 0.0f;
        const u32 i = j < cnt ? idx_in[j] : 0u;
        const u32 b = __float_as_uint(fabsf(x));
        const bool gt = j < cnt && b > kb;
        const bool tie = j < cnt && kb != 0u && b == kb && i <= last;
        const bool kept = warp_compact(gt, i, x, cap, idx_out, val_out, ctl + CTL_SEL) |
                          warp_compact_at(tie, i, x, eq_base, cap, idx_out, val_out, ctl + CTL_TIES);
        if (kept && mask) {
            // The candidates are v's own values (see dgc_topk_select): v - sent = 0, no read.
            v[i] = 0.0f;
            if (mask == 2) {
                u[i] = 0.0f;
            }
        }
    }
}

// Round `round` (0, 1, 2) of the radix select that cuts the ties of the top k (see dgc_filter):
// when more of the cnt candidates equal the k-th largest magnitude CTL_KTH than the top k keeps
// (CTL_EQ > CTL_KEEP, both from the last dgc_radix_round), the (CTL_EQ - CTL_KEEP + 1)-th largest
// index among them, i.e. the CTL_KEEP-th smallest, into CTL_TIE_LAST after round 2. Otherwise
// nothing happens (one read of ctl), so the rounds can be enqueued unconditionally. Uses
// CTL_PREFIX/CTL_WANT and ghist as dgc_radix_round does, never CTL_KTH, CTL_KEEP or CTL_EQ.
// spec = 1: cnt = min(CTL_COUNT, cnt), and nothing happens unless the count is in the band.
extern "C" __global__ void dgc_tie_round(const u32* __restrict__ idx, const float* __restrict__ val,
                                         u32 cnt, int round, u32* ctl, u32* ghist, int spec, u32 min_ok,
                                         u32 band_cap) {
    __shared__ u32 hist[RADIX_BINS];
    __shared__ u32 last_s;
    if (spec) {
        if (!in_band(ctl, min_ok, band_cap)) {
            return;
        }
        cnt = min(cnt, ctl[CTL_COUNT]);
    }
    const u32 kb = ctl[CTL_KTH], keep = ctl[CTL_KEEP], eq = ctl[CTL_EQ];
    if (kb == 0u || eq <= keep) {
        return;
    }
    int shift;
    u32 nbins, hi_mask;
    radix_layout(round, &shift, &nbins, &hi_mask);
    const u32 prefix = round == 0 ? 0u : ctl[CTL_PREFIX];
    for (u32 b = threadIdx.x; b < nbins; b += blockDim.x) {
        hist[b] = 0u;
    }
    __syncthreads();
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < cnt; j += stride) {
        if (__float_as_uint(fabsf(val[j])) == kb) {
            const u32 i = idx[j];
            if (((i ^ prefix) & hi_mask) == 0u) {
                atomicAdd(&hist[(i >> shift) & (nbins - 1u)], 1u);
            }
        }
    }
    radix_finish(hist, &last_s, nbins, shift, prefix, round == 0 ? eq - keep + 1u : ctl[CTL_WANT],
                 round == 2, CTL_TIE_LAST, ctl, ghist);
}

__device__ __forceinline__ int find_sorted(const u32* __restrict__ xs, u32 len, u32 key) {
    u32 lo = 0u, hi = len;
    while (lo < hi) {
        const u32 mid = (lo + hi) >> 1;
        if (xs[mid] < key) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return (lo < len && xs[lo] == key) ? (int)lo : -1;
}

// Decode of `world` gathered messages, each `stride` (index, value) pairs with strictly ascending
// indices, padded with PAD_INDEX. For every index, the thread of its first occurrence (lowest rank)
// sums the values of every rank in rank order starting from 0.0f and stores sum / world (when world
// > 1) into dense, which the caller zeroed: bit-identical to the host's rank-ordered scatter-add and
// division (wire::decode_average). Indices >= n are skipped (the host validated them).
extern "C" __global__ void dgc_decode_sorted(const u32* __restrict__ idx, const float* __restrict__ val,
                                             u32 world, u32 stride, float* dense, u64 n) {
    const u64 total = (u64)world * stride;
    const u64 step = (u64)gridDim.x * blockDim.x;
    const float w = (float)world;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const u32 r = (u32)(t / stride);
        const u32 i = idx[t];
        if (i == PAD_INDEX || (u64)i >= n) {
            continue;
        }
        bool first = true;
        for (u32 q = 0; q < r && first; ++q) {
            first = find_sorted(idx + (u64)q * stride, stride, i) < 0;
        }
        if (!first) {
            continue;
        }
        float sum = __fadd_rn(0.0f, val[t]);
        for (u32 q = r + 1u; q < world; ++q) {
            const int p = find_sorted(idx + (u64)q * stride, stride, i);
            if (p >= 0) {
                sum = __fadd_rn(sum, val[(u64)q * stride + (u32)p]);
            }
        }
        dense[i] = world > 1u ? __fdiv_rn(sum, w) : sum;
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
