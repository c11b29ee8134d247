// bandwidth of reading random segments of S bytes (ascending positions) from a big buffer, with sw prefetch D segments ahead
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>
#include <chrono>
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
float sink[64];
int main(int argc, char** argv) {
  size_t total = (size_t)512 << 20;
  char* buf = (char*)aligned_alloc(1 << 21, total);
  madvise(buf, total, MADV_HUGEPAGE);
  for (size_t i = 0; i < total; i += 4096) buf[i] = 1;
  std::mt19937 rng(1);
  int segs[] = {384, 768, 1152, 2304, 4608};
  int nt = omp_get_max_threads();
  for (int S : segs) for (int D : {0, 4, 8, 16}) for (int regular = 0; regular < 2; ++regular) {
    // choose rows: row size R = 4*S (segment = first S bytes), density 1/3 of rows
    size_t R = (size_t)S * 3;  // rows with gaps: row pitch 3S, pick 1 of 3 rows => ~1/9 of bytes... keep simple
    size_t nrows = total / R;
    std::vector<int64_t> rows;
    for (size_t r = 0; r < nrows; ++r) {
      bool on = regular ? (r % 3 == 0) : (rng() % 3 == 0);
      if (on) rows.push_back(r);
    }
    double best = 1e30; double bytes = (double)rows.size() * S;
    for (int rep = 0; rep < 3; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
      {
        int tid = omp_get_thread_num();
        size_t a = rows.size() * tid / nt, b = rows.size() * (tid + 1) / nt;
        __m512 acc = _mm512_setzero_ps();
        for (size_t q = a; q < b; ++q) {
          if (D && q + D < b) { const char* p = buf + rows[q + D] * R; for (int o = 0; o < S; o += 64) __builtin_prefetch(p + o, 0, 1); }
          const char* p = buf + rows[q] * R;
          for (int o = 0; o < S; o += 64) acc = _mm512_add_ps(acc, _mm512_load_ps((const float*)(p + o)));
        }
        sink[tid * 16] += _mm512_reduce_add_ps(acc);
      }
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, dt);
    }
    printf("S=%5d D=%2d %s  %6.2f GB/s\n", S, D, regular ? "regular" : "random ", bytes / best / 1e9);
  }
  // dense
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
    {
      int tid = omp_get_thread_num(); size_t a = total * tid / nt, b = total * (tid + 1) / nt;
      __m512 acc = _mm512_setzero_ps();
      for (size_t o = a; o < b; o += 64) acc = _mm512_add_ps(acc, _mm512_load_ps((const float*)(buf + o)));
      sink[tid * 16] += _mm512_reduce_add_ps(acc);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  printf("dense %6.2f GB/s (sink %g)\n", total / best / 1e9, sink[0]);
}
