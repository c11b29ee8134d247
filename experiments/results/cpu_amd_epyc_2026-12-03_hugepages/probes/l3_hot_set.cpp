// hot set H read each round (normal prefetch), cold stream from C with a chosen hint; time H and C separately
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>
#include <chrono>
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
template <int HINT, bool FLUSH = false>
static float walk(const char* buf, const std::vector<int64_t>& off, int piece, int pf) {
  __m512 acc = _mm512_setzero_ps();
  const int n = off.size();


  float tot = 0;
#pragma omp parallel num_threads(2) reduction(+:tot)
  {
    int t = omp_get_thread_num();
    __m512 a = _mm512_setzero_ps();
    for (int j = t; j < n; j += 2) {
      if (j + 2 * pf < n) {
        const char* p = buf + off[j + 2 * pf];
        for (int o = 0; o < piece; o += 64) _mm_prefetch(p + o, (_mm_hint)HINT);
      }
      const char* p = buf + off[j];
      for (int o = 0; o < piece; o += 64) a = _mm512_add_ps(a, _mm512_load_ps((const float*)(p + o)));
      if (FLUSH && j >= 4) { const char* q = buf + off[j - 4]; for (int o = 0; o < piece; o += 64) _mm_clflushopt((void*)(q + o)); }
    }
    tot += _mm512_reduce_add_ps(a);
  }
  return tot;
}
int main(int argc, char** argv) {
  const int64_t HOT = (int64_t)atoi(argv[1]) << 20, COLD = (int64_t)atoi(argv[2]) << 20, STREAM = (int64_t)atoi(argv[3]) << 20;
  const int piece = atoi(argv[4]); const int hint = atoi(argv[5]);
  char* h = (char*)aligned_alloc(4096, HOT); char* c = (char*)aligned_alloc(4096, COLD);
  for (int64_t i = 0; i < HOT; i += 4) *(float*)(h + i) = 1.0f;
  for (int64_t i = 0; i < COLD; i += 4) *(float*)(c + i) = 1.0f;
  std::mt19937_64 g(1);
  std::vector<int64_t> ho, co;
  for (int64_t o = 0; o + piece <= HOT; o += 2048) ho.push_back(o);   // pieces spread out in 2 KB rows
  std::shuffle(ho.begin(), ho.end(), g);
  int64_t ncold = STREAM / piece; int64_t slots = COLD / 2048;
  double th = 0, tc = 0; int rounds = 20; float s = 0; int64_t cpos = 0;
  for (int r = 0; r < rounds + 2; ++r) {
    co.clear();
    for (int64_t k = 0; k < ncold; ++k) { co.push_back(((cpos++) % slots) * 2048); }
    std::shuffle(co.begin(), co.end(), g);
    double t0 = now();
    s += walk<_MM_HINT_T1>(h, ho, piece, 16);
    double t1 = now();
    switch (hint) {
      case 0: s += walk<_MM_HINT_NTA>(c, co, piece, 16); break;
      case 1: s += walk<_MM_HINT_T2>(c, co, piece, 16); break;
      case 2: s += walk<_MM_HINT_T1>(c, co, piece, 16); break;
      case 4: s += walk<_MM_HINT_T2, true>(c, co, piece, 16); break;
      default: s += walk<_MM_HINT_T0>(c, co, piece, 16); break;
    }
    double t2 = now();
    if (r >= 2) { th += t1 - t0; tc += t2 - t1; }
  }
  double hb = (double)ho.size() * piece * rounds, cb = (double)ncold * piece * rounds;
  printf("hot %lld MB cold stream %lld MB piece %d hint %d: hot %.1f GB/s, cold %.1f GB/s, total %.2f ms/round (%g)\n",
         (long long)(HOT >> 20), (long long)(STREAM >> 20), piece, hint, hb / th / 1e9, (tc > 0 ? cb / tc : 0) / 1e9, (th + tc) / rounds * 1e3, s);
}
