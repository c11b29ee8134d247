// OpenMP costs on this host: an empty parallel region, an omp barrier, a spin barrier on one atomic (2 threads).
// g++ -O2 -fopenmp omp_costs.cpp -o omp_costs && ./omp_costs   (three repetitions, us each)
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <atomic>
int main(){
  volatile int sink=0;
  for(int rep=0;rep<3;rep++){
  auto t0=std::chrono::steady_clock::now();
  const int N=200000;
  for(int i=0;i<N;i++){
    #pragma omp parallel num_threads(2)
    { sink += omp_get_thread_num(); }
  }
  auto t1=std::chrono::steady_clock::now();
  double us=std::chrono::duration<double,std::micro>(t1-t0).count()/N;
  // barrier cost inside one region
  auto t2=std::chrono::steady_clock::now();
  #pragma omp parallel num_threads(2)
  { for(int i=0;i<N;i++){
      #pragma omp barrier
    } }
  auto t3=std::chrono::steady_clock::now();
  double ub=std::chrono::duration<double,std::micro>(t3-t2).count()/N;
  // spin barrier
  std::atomic<int> cnt{0}; 
  auto t4=std::chrono::steady_clock::now();
  #pragma omp parallel num_threads(2)
  { int tid=omp_get_thread_num(); int gen=0;
    for(int i=0;i<N;i++){ gen+=2; cnt.fetch_add(1,std::memory_order_acq_rel); while(cnt.load(std::memory_order_acquire)<gen){ __builtin_ia32_pause(); } } }
  auto t5=std::chrono::steady_clock::now();
  double us2=std::chrono::duration<double,std::micro>(t5-t4).count()/N;
  printf("fork/join %.3f us, omp barrier %.3f us, spin barrier %.3f us\n", us, ub, us2);
  }
}
