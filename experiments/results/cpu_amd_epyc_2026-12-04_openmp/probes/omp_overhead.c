#include <omp.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
volatile int sink;
int main(){
  int N=200000; double t0,t1;
  for(int r=0;r<3;r++){
  t0=now();
  for(int i=0;i<N;i++){
    #pragma omp parallel num_threads(2)
    { sink+=omp_get_thread_num(); }
  }
  t1=now(); printf("region: %.3f us\n",(t1-t0)/N*1e6);
  t0=now();
  #pragma omp parallel num_threads(2)
  { for(int i=0;i<N;i++){
    #pragma omp barrier
  } }
  t1=now(); printf("barrier: %.3f us\n",(t1-t0)/N*1e6);
  }
}
