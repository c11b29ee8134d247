// up+down rows of SmolLM2-shaped FFNs (30 layers, F=1536, d=576, bf16 rows of 1152 B), 1/3 of units on, at random.
// A: up and down in separate arrays, two passes (up rows, then down rows); B: [up|down] interleaved, one pass.
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
static inline __m512 rd(const char* p, int S, __m512 acc) { for (int o = 0; o < S; o += 64) acc = _mm512_add_ps(acc, _mm512_load_ps((const float*)(p + o))); return acc; }
static inline void pf(const char* p, int S) { for (int o = 0; o < S; o += 64) __builtin_prefetch(p + o, 0, 1); }
float sink[64];
int main() {
  const int L = 30, F = 1536, S = 1152, D = 4; const int NT = 2;
  size_t per = (size_t)F * S * 2, total = per * L;
  char* buf = (char*)aligned_alloc(1 << 21, total);
  madvise(buf, total, MADV_HUGEPAGE);
  for (size_t i = 0; i < total; i += 64) buf[i] = 1;
  char* evict = (char*)aligned_alloc(1 << 21, 64 << 20);
  std::mt19937 rng(7);
  for (int round = 0; round < 30; ++round) for (int var = 0; var < 2; ++var) {
    std::vector<std::vector<int>> on(L);
    for (int l = 0; l < L; ++l) for (int u = 0; u < F; ++u) if (rng() % 3 == 0) on[l].push_back(u);
    for (size_t i = 0; i < (64u << 20); i += 64) evict[i]++;
    auto t0 = std::chrono::steady_clock::now(); double bytes = 0;
    for (int l = 0; l < L; ++l) {
      char* base = buf + per * l; const auto& u = on[l]; bytes += (double)u.size() * 2 * S;
#pragma omp parallel num_threads(NT)
      {
        int tid = omp_get_thread_num(); int c0 = 0, c1 = 0; for (int q = 0; q < (int)u.size(); ++q) { if (u[q] < F * tid / NT) c0 = q + 1; if (u[q] < F * (tid + 1) / NT) c1 = q + 1; }
        __m512 acc = _mm512_setzero_ps();
        if (var == 0) {
          const char* up = base; const char* dn = base + (size_t)F * S;
          for (int q = c0; q < c1; ++q) { if (q + D < c1) pf(up + (size_t)u[q + D] * S, S); acc = rd(up + (size_t)u[q] * S, S, acc); }
          for (int q = c0; q < c1; ++q) { if (q + D < c1) pf(dn + (size_t)u[q + D] * S, S); acc = rd(dn + (size_t)u[q] * S, S, acc); }
        } else {
          for (int q = c0; q < c1; ++q) { if (q + D < c1) pf(base + (size_t)u[q + D] * 2 * S, 2 * S); acc = rd(base + (size_t)u[q] * 2 * S, 2 * S, acc); }
        }
        sink[tid * 16] += _mm512_reduce_add_ps(acc);
      }
    }
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%g ", sink[0]); printf("round %d %s  %.3f ms  %.2f GB/s\n", round, var ? "interleaved" : "separate   ", dt * 1e3, bytes / dt / 1e9);
  }
}
