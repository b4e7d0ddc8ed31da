// Machine ceiling for the in-process two-shot all-reduce against the bench's memcpy peer
// (benches/RESULTS.md, sections 1c and 1f). N=4 ranks of S MiB (second argument, default 64).
//
// An out-of-place all-reduce must read N·S and write N·S bytes; the peer is one thread's memcpy of
// S (read S, write S). If the whole machine moves at most B bytes/s (reads + writes), the
// all-reduce takes at least 2·N·S/B, so busbw/memcpy <= (2(N-1)/N)·S / (2·N·S/B) / memcpy
// = 0.1875 · B / memcpy at N = 4. B is the best of two patterns over T threads: a non-temporal
// copy, and the two-shot all-reduce itself (each thread reduces its chunk of all N inputs into all
// N outputs with non-temporal stores, as src/engine/direct.rs does). The two-shot line also gives
// the ratio that this C loop itself reaches.
//   gcc -O3 -march=native -pthread benches/probes/twoshot_ceiling.c -o /tmp/ts && /tmp/ts 2 && /tmp/ts 4
//   /tmp/ts 2 16           # 16 MiB per rank
//   /tmp/ts 4 16 barrier   # a barrier before every repetition, as a real collective has one
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static long S = 64L << 20;
#define N 4
#define REPS 5
#define TILE 4096
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static float *in[N], *out[N];
static int T, sync_reps;
static pthread_barrier_t bar;

static void *nt_copy(void *p) {  // thread i copies its 1/T of in[0] into out[0]
  long i = (long)p, n = S / 4 / T, lo = i * n;
  float *s = in[0], *d = out[0];
  for (int it = 0; it < REPS; it++)
    for (long k = lo; k < lo + n; k += 16) {
      __m128 a = _mm_load_ps(s + k), b = _mm_load_ps(s + k + 4), c = _mm_load_ps(s + k + 8), e = _mm_load_ps(s + k + 12);
      _mm_stream_ps(d + k, a); _mm_stream_ps(d + k + 4, b); _mm_stream_ps(d + k + 8, c); _mm_stream_ps(d + k + 12, e);
    }
  _mm_sfence(); return 0;
}

static void *two_shot(void *p) {  // thread i owns chunks i, i+T, ... of the N chunks (AVX)
  __m256 acc[TILE / 8];
  long cnt = S / 4 / N;
  for (int it = 0; it < REPS; it++) {
    if (sync_reps) pthread_barrier_wait(&bar);  // every rank starts each all-reduce together
    for (long c = (long)p; c < N; c += T)
      for (long t = c * cnt; t < (c + 1) * cnt; t += TILE) {
        for (long i = 0; i < TILE / 8; i++) acc[i] = _mm256_add_ps(_mm256_load_ps(in[0] + t + 8 * i), _mm256_load_ps(in[1] + t + 8 * i));
        for (int k = 2; k < N; k++)
          for (long i = 0; i < TILE / 8; i++) acc[i] = _mm256_add_ps(acc[i], _mm256_load_ps(in[k] + t + 8 * i));
        for (int k = 0; k < N; k++)
          for (long i = 0; i < TILE / 8; i++) _mm256_stream_ps(out[k] + t + 8 * i, acc[i]);
      }
  }
  _mm_sfence(); return 0;
}

static double run(void *(*f)(void *)) {
  pthread_t th[64]; double t0 = now();
  for (long i = 0; i < T; i++) pthread_create(&th[i], 0, f, (void *)i);
  for (int i = 0; i < T; i++) pthread_join(th[i], 0);
  return (now() - t0) / REPS;
}

int main(int argc, char **argv) {
  T = argc > 1 ? atoi(argv[1]) : 2;
  if (T < 1 || T > 64) return 1;
  if (argc > 2) S = atol(argv[2]) << 20;
  if (S < (1L << 20)) return 1;
  sync_reps = argc > 3 && strcmp(argv[3], "barrier") == 0;
  pthread_barrier_init(&bar, 0, T);
  for (int i = 0; i < N; i++) { in[i] = aligned_alloc(64, S); out[i] = aligned_alloc(64, S); memset(in[i], 1, S); memset(out[i], 0, S); }
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now();
    for (int it = 0; it < REPS; it++) memcpy(out[1], in[1], S);
    double mc = (double)S * REPS / (now() - t0) / 1e9;
    double b_copy = 2.0 * S / run(nt_copy) / 1e9;
    double t_ts = run(two_shot), b_ts = 2.0 * N * S / t_ts / 1e9;
    double b = b_copy > b_ts ? b_copy : b_ts;
    printf("T=%d%s memcpy(1 thread) %.2f GB/s | NT copy moves %.1f GB/s | two-shot %.2f ms, moves %.1f GB/s, "
           "busbw/memcpy %.3f | ceiling %.3f\n",
           T, sync_reps ? " (barrier)" : "", mc, b_copy, t_ts * 1e3, b_ts, 1.5 * S / t_ts / 1e9 / mc, 0.1875 * b / mc);
  }
}
