// The decoder's old argmax (the scalar scan) over 49,152 floats: gcc -O3 -march=native argmax_scan.c && ./a.out
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <stdint.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(){int V=49152;float*lg=malloc(V*4);for(int i=0;i<V;i++)lg[i]=(float)rand()/RAND_MAX;
volatile long sink=0;double t0=now();int R=2000;
for(int r=0;r<R;r++){lg[r%V]+=1e-7f;long best=0;for(long i=1;i<V;i++)if(lg[i]>lg[best])best=i;sink+=best;}
printf("argmax %.2f us\n",(now()-t0)/R*1e6);
// rmsnorm-ish 576
return 0;}
