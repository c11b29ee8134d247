// The decode attention alone (cwic_cpu::attention, SmolLM2 heads: 9 query, 3 kv, head dim 64, bf16 cache), 30 layers
// cycled; best of 50 per-call means. Build beside copies of kernels/cpu/cwic_cpu.{cpp,h} and cwic_cpu_impl.inc:
//   g++ -O3 -std=c++17 -fopenmp -I. attention_bench.cpp cwic_cpu.cpp -o ab && ./ab T THREADS [cold]
#include "cwic_cpu.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstdint>
#include <cstring>
static uint16_t bf(float f){uint32_t u;memcpy(&u,&f,4);return (uint16_t)(u>>16);}
int main(int argc,char**argv){
  int T=argc>1?atoi(argv[1]):74, nt=argc>2?atoi(argv[2]):1, L=30;
  int nh=9,nkv=3,hd=64;
  std::vector<float> q(nh*hd*L), out(nh*hd), scr(nh*T);
  std::vector<uint16_t> kc((size_t)T*nkv*hd*L), vc((size_t)T*nkv*hd*L);
  for(auto&x:q)x=(float)rand()/RAND_MAX-0.5f;
  for(auto&x:kc)x=bf((float)rand()/RAND_MAX-0.5f);
  for(auto&x:vc)x=bf((float)rand()/RAND_MAX-0.5f);
  std::vector<char> junk(64<<20);
  double best=1e9;
  for(int rep=0;rep<50;rep++){
    if(argc>3) for(size_t i=0;i<junk.size();i+=64) junk[i]++;
    auto t0=std::chrono::steady_clock::now();
    for(int l=0;l<L;l++) cwic_cpu::attention(q.data()+l*nh*hd, kc.data()+(size_t)l*T*nkv*hd, vc.data()+(size_t)l*T*nkv*hd, cwic_cpu::W_BF16, T, nh, nkv, hd, 0.125f, out.data(), scr.data(), nt, -1);
    double us=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()/L*1e6;
    if(us<best)best=us;
  }
  printf("T=%d threads=%d %s: best %.2f us/call\n",T,nt,argc>3?"cold":"warm",best);
}
