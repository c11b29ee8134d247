#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
float out[64];
int main() {
  size_t total = (size_t)1 << 30;
  char* buf = (char*)aligned_alloc(1 << 21, total);
  madvise(buf, total, MADV_HUGEPAGE);
  for (size_t i = 0; i < total; i += 64) buf[i] = (char)i;
  for (int nt = 1; nt <= 2; ++nt) for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
    {
      int tid = omp_get_thread_num(); size_t a = total / nt * tid, b = total / nt * (tid + 1);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (size_t o = a; o < b; o += 256) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps((const float*)(buf + o)));
        a1 = _mm512_add_ps(a1, _mm512_load_ps((const float*)(buf + o + 64)));
        a2 = _mm512_add_ps(a2, _mm512_load_ps((const float*)(buf + o + 128)));
        a3 = _mm512_add_ps(a3, _mm512_load_ps((const float*)(buf + o + 192)));
      }
      out[tid * 16] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("threads %d: %.2f GB/s (%.1f ms)\n", nt, total / dt / 1e9, dt * 1e3);
  }
  printf("%f\n", out[0]);
}
