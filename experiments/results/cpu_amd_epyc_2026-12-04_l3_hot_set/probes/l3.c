#define _POSIX_C_SOURCE 200809L
#include <time.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#include <immintrin.h>
#define SEG 384
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t total=(size_t)256<<20; double hot_mb=atof(argv[1]); double cold_mb=atof(argv[2]); int tokens=atoi(argv[3]);
  size_t nseg=total/SEG; char*buf=aligned_alloc(4096,total); memset(buf,1,total);
  uint8_t*hot=calloc(nseg,1); srand(1);
  size_t nhot=(size_t)(hot_mb*1048576/SEG); for(size_t k=0;k<nhot;){size_t s=((size_t)rand()*RAND_MAX+rand())%nseg; if(!hot[s]){hot[s]=1;k++;}}
  double pcold=cold_mb*1048576/SEG/(double)(nseg-nhot);
  int32_t**lists=malloc(sizeof(void*)*tokens); int*cnt=calloc(tokens,sizeof(int));
  for(int t=0;t<tokens;t++){lists[t]=malloc(4*nseg);int c=0;for(size_t s=0;s<nseg;s++){if(hot[s]||rand()<pcold*RAND_MAX)lists[t][c++]=s;}cnt[t]=c;}
  const char*names[4]={"all T2","cold NTA, hot T2","all NTA","cold T0.. hot T2 (control)"};
  for(int round=0;round<3;round++) for(int v=0;v<3;v++){
    double t0=now(); float sink=0;
    for(int t=0;t<tokens;t++){
      int c=cnt[t]; int32_t*L=lists[t];
      #pragma omp parallel reduction(+:sink)
      { int nt=omp_get_num_threads(), id=omp_get_thread_num(); int lo=(long)c*id/nt, hi=(long)c*(id+1)/nt;
        __m512 acc=_mm512_setzero_ps();
        for(int j=lo;j<hi;j++){
          if(j+16<hi){ int s=L[j+16]; char*p=buf+(size_t)s*SEG; int h = v==0?1: v==2?0: hot[s];
            for(int o=0;o<SEG;o+=64){ if(h) _mm_prefetch(p+o,_MM_HINT_T2); else _mm_prefetch(p+o,_MM_HINT_NTA);} }
          float*q=(float*)(buf+(size_t)L[j]*SEG);
          for(int o=0;o<SEG/4;o+=16) acc=_mm512_add_ps(acc,_mm512_load_ps(q+o));
        }
        sink+=_mm512_reduce_add_ps(acc); }
    }
    double dt=now()-t0; double mb=0; for(int t=0;t<tokens;t++) mb+=cnt[t]*(double)SEG/1048576;
    printf("round %d %-18s %.3f ms/token  %.1f GB/s (%.0f MiB/token) sink %g\n",round,names[v],dt/tokens*1e3,mb*1048576/dt/1e9,mb/tokens,sink);
  }
}
