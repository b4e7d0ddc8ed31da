// Machine ceiling for the in-process two-shot all-reduce (benches/RESULTS.md, section 1c):
// N=4 ranks of S=64 MiB; T threads each reduce its chunk(s) of all inputs into all outputs with
// non-temporal stores, as src/engine/twoshot.rs does.
//   gcc -O3 -march=native -pthread benches/probes/twoshot_ceiling.c -o /tmp/ts && /tmp/ts 4 && /tmp/ts 2
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <emmintrin.h>
#define S (64<<20)
#define N 4
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
float *in[N],*out[N]; int NT; int TILEF=4096;
void* work(void*p){long r=(long)p; long cnt=S/4/N; long lo=r*cnt, hi=lo+cnt; float acc[16384] __attribute__((aligned(64)));
 for(int it=0;it<5;it++) for(long t=lo;t<hi;t+=TILEF){ long m=TILEF; if(t+m>hi)m=hi-t;
  for(long i=0;i<m;i++) acc[i]=in[0][t+i]+in[1][t+i]; for(int k=2;k<N;k++) for(long i=0;i<m;i++) acc[i]+=in[k][t+i];
  for(int k=0;k<N;k++){ float*d=out[k]+t; for(long i=0;i<m;i+=4) _mm_stream_ps(d+i,_mm_load_ps(acc+i));}}
 _mm_sfence(); return 0;}
int main(int argc,char**argv){int nt=atoi(argv[1]); for(int i=0;i<N;i++){in[i]=aligned_alloc(64,S);out[i]=aligned_alloc(64,S);memset(in[i],0,S);memset(out[i],0,S);}
 pthread_t th[8]; double t0=now(); for(long i=0;i<nt;i++) pthread_create(&th[i],0,work,(void*)(i*N/nt)); /* nt threads each one chunk; if nt<N do multiple */
 for(int i=0;i<nt;i++) pthread_join(th[i],0); double dt=now()-t0; 
 printf("threads %d: %.2f ms per allreduce-equivalent (%d chunks of %d), traffic %.1f GB/s\n",nt,dt/5*1e3*N/nt, nt, N, (double)nt/N*2.0*N*S*5/dt/1e9);}
